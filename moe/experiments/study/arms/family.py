"""A family of fine-tunes merged back: `finetune_seeds` fine-tunes of one expert's branch on its
domain (different data orders), merged with `merge_method`; the merge replaces that branch in
the BTX MoE, and the fine-tunes' compute counts toward the experts' budget."""

from __future__ import annotations

from moe.experiments.study.arms import Arm, ModelSpec, StageSpec, register


@register
class Family(Arm):
    name = "family"
    label = ""
    description = "fine-tunes of one expert merged back into it (merge_method)"
    order = 80
    requires = ("branches",)

    def stages(self, ctx):
        s, b, r = ctx.study, ctx.budget, ctx.recipe
        fam = s.finetune_family
        out = []
        for k in s.finetune_seeds:
            name = f"ft-{fam}-{k}"
            out.append(
                StageSpec(
                    name, "train", (f"branch-{fam}",),
                    lambda name=name, k=k: ctx.train(
                        name, "dense", b.finetune_steps, init=ctx.model_dir(f"branch-{fam}"),
                        seed=r.seed + k, data=ctx.domain_data(fam),
                    ),
                    steps=b.finetune_steps, tokens=b.finetune_steps * b.tokens_per_step,
                )
            )
        fts = [f"ft-{fam}-{k}" for k in s.finetune_seeds]
        out.append(
            StageSpec(
                f"merge-{fam}", "merge", tuple(fts),
                lambda: ctx.merge(f"merge-{fam}", fts, f"branch-{fam}", s.merge_method),
            )
        )
        return out

    def models(self, ctx):
        fam = ctx.study.finetune_family
        fts = tuple(f"ft-{fam}-{k}" for k in ctx.study.finetune_seeds)
        out = [
            ModelSpec(n, "", ("seed", f"branch-{fam}", n), checkpoint=n, role="finetune",
                      extra={"family": fam})
            for n in fts
        ]
        out.append(
            ModelSpec(f"merge-{fam}", "", ("seed", f"branch-{fam}") + fts,
                      checkpoint=f"merge-{fam}", role="merge",
                      extra={"family": fam, "method": ctx.study.merge_method, "inputs": fts})
        )
        return out
