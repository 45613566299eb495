"""Domain branches: one dense model per expert, each trained on its own domain's stream only.

protocol=fork: each branch forks from the seed's final state (weights, AdamW state, step, LR;
split_method=copy, so a branch starts as the seed itself) and trains `branch_steps` more steps
on its domain, cooling down at its end (BTM; FlexOlmo). With study.shared=frozen only the FFN
trains (FlexOlmo), so the branches keep the seed's attention and embeddings exactly.
protocol=rewarm: the seed is split (`split_method`) into an MoE, and each branch (shared weights
plus its expert) restarts with a fresh optimizer and warm-up.
"""

from __future__ import annotations

from moe.experiments.study.arms import Arm, ModelSpec, StageSpec, register


def branch_lineage(ctx, e: str) -> tuple[str, ...]:
    return ("seed", f"branch-{e}")


@register
class Branches(Arm):
    name = "branches"
    label = ""  # each branch is a row of the specialization matrix, not an arm of the answer
    description = "one branch per expert, trained on its own domain's stream"
    order = 85
    requires = ("seed",)

    def stages(self, ctx):
        s, b, r = ctx.study, ctx.budget, ctx.recipe
        frozen = s.shared == "frozen"
        out = []
        if not ctx.fork:
            out.append(StageSpec("split", "split", ("seed",), lambda: ctx.split("split", "seed")))
        for e in s.experts:
            name = f"branch-{e}"
            if ctx.fork:
                end = b.seed_steps + b.branch_steps
                run = lambda name=name, e=e, end=end: ctx.train(  # noqa: E731
                    name, "branch", end, init=ctx.model_dir("seed"), seed=r.seed, fork="seed",
                    schedule_steps=end, branch_domain=e, freeze_shared=frozen,
                )
                deps = ("seed",)
            else:
                run = lambda name=name, e=e: ctx.train(  # noqa: E731
                    name, "branch", b.branch_steps, init=ctx.model_dir("split"), seed=r.seed,
                    branch_domain=e, freeze_shared=frozen,
                )
                deps = ("split",)
            out.append(
                StageSpec(name, "train", deps, run, steps=b.branch_steps,
                          tokens=b.branch_steps * b.tokens_per_step)
            )
        return out

    def models(self, ctx):
        return [
            ModelSpec(
                f"branch-{e}", "", branch_lineage(ctx, e), checkpoint=f"branch-{e}",
                role="branch", extra={"domain": e},
            )
            for e in ctx.study.experts
        ]
