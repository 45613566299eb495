"""Parameter average of the domain branches (a uniform linear merge across families), the
simplest way back to one dense model; BTM reports it well below the ensemble."""

from __future__ import annotations

from moe.experiments.study.arms import Arm, ModelSpec, StageSpec, register


@register
class ParameterAverage(Arm):
    name = "average"
    label = "parameter average"
    description = "uniform parameter average of the domain branches"
    order = 70
    requires = ("branches",)

    def stages(self, ctx):
        members = [f"branch-{e}" for e in ctx.study.experts]
        return [
            StageSpec(
                "avg", "merge", tuple(members),
                lambda: ctx.merge("avg", members, None, "linear", allow_cross_family=True),
            )
        ]

    def models(self, ctx):
        lineage = ("seed",) + tuple(f"branch-{e}" for e in ctx.study.experts)
        return [ModelSpec("avg", self.label, lineage, checkpoint="avg", role="average")]
