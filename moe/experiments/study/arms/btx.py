"""Branch-Train-MiX (Sukhbaatar et al. 2024): the branches' FFNs become the experts of one MoE
(the family's merged expert in place of its branch), then the whole MoE, router included, is
fine-tuned on the mixed stream with `moe_finetune_fraction` of the branches' FLOPs.

Shared (non-FFN) weights, `study.shared`: average (BTX: mean over the branches), seed (the
seed's, at the fork point), frozen (FlexOlmo: branches trained only their FFN, so the shared
weights are the seed's exactly). `generalist_expert` adds the seed's FFN as one more expert.
"""

from __future__ import annotations

from moe.experiments.study.arms import Arm, ModelSpec, StageSpec, register


def expert_stages(ctx) -> list[str]:
    fam = ctx.study.finetune_family if "family" in ctx.arms else None
    return [f"merge-{e}" if e == fam else f"branch-{e}" for e in ctx.study.experts]


def _assemble(ctx) -> None:
    from moe.surgery.experts import assemble_checkpoints

    s, r = ctx.study, ctx.recipe
    use_seed = s.shared in ("seed", "frozen")
    assemble_checkpoints(
        [ctx.model_dir(n) for n in expert_stages(ctx)],
        ctx.model_dir("btx"),
        experts=list(s.experts),
        shared="base" if use_seed else "average",
        base=ctx.model_dir("seed") if use_seed else None,
        router="learned",
        top_k=s.router_top_k,
        router_init=s.router_init,
        seed=r.seed,
        overwrite=True,
        generalist=ctx.model_dir("seed") if s.generalist_expert else None,
    )


@register
class BTX(Arm):
    name = "btx"
    label = "experts (BTX MoE)"
    description = "branches assembled into one MoE, then fine-tuned whole on the mixed stream"
    order = 10
    requires = ("branches",)

    def stages(self, ctx):
        s, b, r = ctx.study, ctx.budget, ctx.recipe
        deps = tuple(expert_stages(ctx))
        if s.shared in ("seed", "frozen") or s.generalist_expert:
            deps = ("seed",) + deps
        return [
            StageSpec("btx", "assemble", deps, lambda: _assemble(ctx)),
            StageSpec(
                "moe", "train", ("btx",),
                lambda: ctx.train(
                    "moe", "router", b.moe_steps, init=ctx.model_dir("btx"), seed=r.seed + 500,
                    lr=s.router_lr,
                ),
                steps=b.moe_steps, tokens=b.moe_steps * b.tokens_per_step,
            ),
        ]

    def lineage(self, ctx) -> tuple[str, ...]:
        s = ctx.study
        out = ["seed"] + [f"branch-{e}" for e in s.experts]
        if "family" in ctx.arms:
            out += [f"ft-{s.finetune_family}-{k}" for k in s.finetune_seeds]
        return tuple(out)

    def models(self, ctx):
        base = self.lineage(ctx)
        return [
            ModelSpec("btx", "", base, checkpoint="btx", role="moe"),
            ModelSpec("moe", self.label, base + ("moe",), checkpoint="moe", role="moe"),
        ]
