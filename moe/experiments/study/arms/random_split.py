"""Control (BTM's random-split ensemble): branches forked like the domain branches, with the same
steps, but each trained on the *mixed* stream in its own data order instead of one domain.
Their posterior-weighted ensemble has the domain ensemble's compute and parameters, so what the
domain ensemble gains over it comes from the domain split, not from ensembling."""

from __future__ import annotations

from moe.experiments.study.arms import Arm, ModelSpec, StageSpec, register

SEED_STRIDE = 7919  # data-order seed of control branch k: seed + SEED_STRIDE * (k + 1)


def names(ctx) -> list[str]:
    return [f"random-{k}" for k in range(len(ctx.study.experts))]


@register
class RandomSplit(Arm):
    name = "random_split"
    label = "random-split ensemble (control)"
    description = "control: branches on random shards of the mixed stream, ensembled"
    order = 60
    requires = ("seed",)

    def stages(self, ctx):
        b, r = ctx.budget, ctx.recipe
        out = []
        for k, name in enumerate(names(ctx)):
            seed = r.seed + SEED_STRIDE * (k + 1)
            if ctx.fork:
                end = b.seed_steps + b.branch_steps
                run = lambda name=name, seed=seed, end=end: ctx.train(  # noqa: E731
                    name, "dense", end, init=ctx.model_dir("seed"), seed=seed, fork="seed",
                    schedule_steps=end,
                )
            else:
                run = lambda name=name, seed=seed: ctx.train(  # noqa: E731
                    name, "dense", b.branch_steps, init=ctx.model_dir("seed"), seed=seed
                )
            out.append(StageSpec(name, "train", ("seed",), run, steps=b.branch_steps,
                                 tokens=b.branch_steps * b.tokens_per_step))
        return out

    def models(self, ctx):
        members = tuple(names(ctx))
        return [ModelSpec("random-btm", self.label, ("seed",) + members, members=members,
                          role="ensemble")]
