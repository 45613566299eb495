"""The seed: a dense model on the mixed stream, shared by every arm.

Under protocol=fork it trains the first `seed_fraction` of the monolith's schedule (which spans
the whole budget) and stops in its stable phase; its final Lightning state is the fork point.
Under protocol=rewarm it is a complete run of its own (warm-up and decay within its steps).
With `init:` set in the recipe (a pretrained checkpoint from `moe import`), the seed run starts
from it instead of a random initialisation.
"""

from __future__ import annotations

from pathlib import Path

from moe.experiments.study.arms import Arm, ModelSpec, StageSpec, register


@register
class Seed(Arm):
    name = "seed"
    label = "seed"
    description = "the dense seed model every arm starts from (mixed stream)"
    order = 100

    def stages(self, ctx):
        b, r = ctx.budget, ctx.recipe
        schedule = b.total_steps if ctx.fork else b.seed_steps
        # a recipe's `init:` (e.g. an imported pretrained model) is where the seed run starts
        init = Path(r.init) if r.init else None
        return [
            StageSpec(
                "seed",
                "train",
                (),
                lambda: ctx.train(
                    "seed", "dense", b.seed_steps, init=init, seed=r.seed, schedule_steps=schedule
                ),
                steps=b.seed_steps,
                tokens=b.seed_steps * b.tokens_per_step,
            )
        ]

    def models(self, ctx):
        return [ModelSpec("seed", self.label, ("seed",), checkpoint="seed", role="seed")]
