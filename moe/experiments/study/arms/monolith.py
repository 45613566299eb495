"""The monolithic baselines: one dense model on the mixed stream with the experts' compute.

`monolith` (compute-matched, the reference arm): under protocol=fork it is the seed run itself
continued to the end of the budget and cooled down there (BTM's baseline), bit-identical to a
run that was never forked. `monolith_data` (data-matched): the seed continued for as many tokens
as the experts trained on after the seed, with a cool-down at its own end.
Under protocol=rewarm both restart from the seed's weights with a fresh warm-up.
"""

from __future__ import annotations

from moe.experiments.study.arms import Arm, ModelSpec, StageSpec, register

REFERENCE_LABEL = "monolithic, compute-matched"


def _continue(ctx, name: str, total: int, seed_offset: int) -> StageSpec:
    b, r = ctx.budget, ctx.recipe
    post = total - b.seed_steps
    if ctx.fork:
        # the seed's own data order continues (same seed): the run never forked
        run = lambda: ctx.train(  # noqa: E731
            name, "dense", total, init=ctx.model_dir("seed"), seed=r.seed, fork="seed",
            schedule_steps=total,
        )
    else:
        run = lambda: ctx.train(  # noqa: E731
            name, "dense", post, init=ctx.model_dir("seed"), seed=r.seed + seed_offset
        )
    return StageSpec(name, "train", ("seed",), run, steps=post, tokens=post * b.tokens_per_step)


@register
class Monolith(Arm):
    name = "monolith"
    label = REFERENCE_LABEL
    description = "the seed continued on the mixed stream to the experts' FLOPs (reference)"
    order = 30
    requires = ("seed",)

    def stages(self, ctx):
        return [_continue(ctx, "dense-compute", ctx.budget.total_steps, 1000)]

    def models(self, ctx):
        return [
            ModelSpec(
                "dense-compute", self.label, ("seed", "dense-compute"),
                checkpoint="dense-compute", role="monolith",
            )
        ]


@register
class MonolithData(Arm):
    name = "monolith_data"
    label = "monolithic, data-matched"
    description = "the seed continued on the mixed stream for the experts' training tokens"
    order = 40
    requires = ("seed",)

    def stages(self, ctx):
        return [_continue(ctx, "dense-data", ctx.budget.data_matched_steps, 2000)]

    def models(self, ctx):
        return [
            ModelSpec(
                "dense-data", self.label, ("seed", "dense-data"),
                checkpoint="dense-data", role="monolith",
            )
        ]


def _from_scratch(ctx, arm: str, name: str, ffn_mult: int, seed_offset: int) -> StageSpec:
    """A dense model `ffn_mult` times the seed's FFN width, trained from scratch on the mixed
    stream for the monolith's training FLOPs (fewer steps: each costs more), with a schedule of
    its own (the recipe's warm-up, stable phase and cool-down)."""
    from moe.config import ConfigError
    from moe.experiments.study.budget import steps_for_budget, widened_model

    r, b = ctx.recipe, ctx.budget
    if r.init:
        raise ConfigError(
            f"study.arms: {arm} trains a wider model from scratch, which a study starting from "
            "a pretrained `init:` cannot match; drop it from study.arms"
        )
    model = widened_model(r, ffn_mult)
    steps = steps_for_budget(r, b, model)
    return StageSpec(
        name, "train", (),
        lambda: ctx.train(name, "dense", steps, init=None, seed=r.seed + seed_offset,
                          model=model),
        steps=steps, tokens=steps * b.tokens_per_step,
    )


def _n_experts(ctx) -> int:
    return len(ctx.study.experts) + int(ctx.study.generalist_expert)


@register
class MonolithParams(Arm):
    name = "monolith_params"
    label = "monolithic, parameter-matched"
    description = ("a dense model with the BTX MoE's total parameters (FFN x experts), trained "
                   "from scratch with the monolith's FLOPs")
    order = 32

    def stages(self, ctx):
        return [_from_scratch(ctx, self.name, "dense-params", _n_experts(ctx), 3000)]

    def models(self, ctx):
        return [ModelSpec("dense-params", self.label, ("dense-params",),
                          checkpoint="dense-params", role="monolith")]


@register
class MonolithActive(Arm):
    name = "monolith_active"
    label = "monolithic, inference-matched"
    description = ("a dense model with the BTX MoE's active parameters per token (FFN x top-k), "
                   "trained from scratch with the monolith's FLOPs")
    order = 34

    def stages(self, ctx):
        return [_from_scratch(ctx, self.name, "dense-active", ctx.study.router_top_k, 4000)]

    def models(self, ctx):
        return [ModelSpec("dense-active", self.label, ("dense-active",),
                          checkpoint="dense-active", role="monolith")]
