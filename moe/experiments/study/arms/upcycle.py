"""Sparse upcycling (Komatsuzaki et al. 2023), the control for BTX: the seed at the fork point
becomes the same MoE the BTX arm builds (its FFN copied into every expert, a new router) and
the whole MoE trains on the mixed stream for the monolith's remaining FLOPs. It has the BTX MoE's
parameters, active parameters and compute, and no domain-separated training: what BTX gains
over it is what branching on separated data buys."""

from __future__ import annotations

from moe.experiments.study.arms import Arm, ModelSpec, StageSpec, register


@register
class Upcycle(Arm):
    name = "upcycle"
    label = "sparse upcycling (mixed stream)"
    description = ("the seed upcycled to the BTX MoE (FFN copied into each expert) and trained "
                   "on the mixed stream with the monolith's remaining FLOPs")
    order = 36
    requires = ("seed",)

    def stages(self, ctx):
        s, b, r = ctx.study, ctx.budget, ctx.recipe
        steps = max(1, round(b.monolith_flops_after_seed / b.moe_flops_per_step))
        return [
            StageSpec("upcycle-init", "split", ("seed",),
                      lambda: ctx.split("upcycle-init", "seed", method="copy")),
            StageSpec(
                "upcycle", "train", ("upcycle-init",),
                lambda: ctx.train("upcycle", "router", steps, init=ctx.model_dir("upcycle-init"),
                                  seed=r.seed + 600, lr=s.router_lr, trainable="all"),
                steps=steps, tokens=steps * b.tokens_per_step,
            ),
        ]

    def models(self, ctx):
        return [ModelSpec("upcycle", self.label, ("seed", "upcycle"), checkpoint="upcycle",
                          role="moe")]
