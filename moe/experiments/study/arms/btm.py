"""Branch-Train-Merge ensemble: the domain branches' next-token distributions mixed per position
by each branch's posterior given the context (Li et al. 2022). No training of its own."""

from __future__ import annotations

from moe.experiments.study.arms import Arm, ModelSpec, register


@register
class BTMEnsemble(Arm):
    name = "btm"
    label = "BTM ensemble"
    description = "posterior-weighted ensemble of the domain branches (Branch-Train-Merge)"
    order = 50
    requires = ("branches",)

    def models(self, ctx):
        members = tuple(f"branch-{e}" for e in ctx.study.experts)
        return [ModelSpec("btm", self.label, ("seed",) + members, members=members,
                          role="ensemble")]


@register
class CBTMTop1(Arm):
    name = "cbtm"
    label = "c-BTM top-1 ensemble"
    description = ("the domain branches with top-1 routing (c-BTM): each token is predicted by "
                   "the one branch whose domain's token-frequency centroid is nearest its context")
    order = 52
    requires = ("branches",)

    def models(self, ctx):
        members = tuple(f"branch-{e}" for e in ctx.study.experts)
        return [ModelSpec("cbtm", self.label, ("seed",) + members, members=members,
                          role="ensemble", extra={"route": "centroid", "top_k": 1})]
