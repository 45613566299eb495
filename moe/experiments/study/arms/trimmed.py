"""Domain-trimmed specialists (issue 14): instead of copying the seed's FFN into every expert
(the copy split) and training each copy on its domain, each expert is the seed's FFN *pruned*
by its own domain's importance scores (`prune.trim_ffn` of the neurons removed, ranked by
`prune.trim_method` on calibration batches of that domain's training split, moe prune). The
trimmed experts are assembled into one MoE over the seed's shared weights (the existing BTX
assembly, learned router, `study.router_top_k`, `study.router_init`), which is then fine-tuned
whole on the mixed stream, like BTX's MoE fine-tune.

Compute: pruning trains nothing, so the MoE fine-tune gets all the monolith's post-seed FLOPs
(its steps are the monolith's post-seed FLOPs over the trimmed MoE's FLOPs per step): the arm is
compute-matched to the monolith and to BTX, whose experts spend the same FLOPs on branches
plus a shorter MoE fine-tune. Its experts are smaller (fewer FLOPs per token at inference).
"""

from __future__ import annotations

import dataclasses

from moe.experiments.study.arms import Arm, ModelSpec, StageSpec, register


def trimmed_config(ctx):
    """The assembled trimmed MoE's config (for its FLOPs per step)."""
    from moe.config import MoEConfig
    from moe.experiments.study.budget import dense_config
    from moe.surgery.prune import n_removed

    s, p = ctx.study, ctx.recipe.prune
    m = dense_config(ctx.recipe)
    keep = m.ffn_dim - n_removed(m.ffn_dim, p.trim_ffn, "ffn", False)
    return dataclasses.replace(m, ffn_dim=keep, moe=MoEConfig(
        experts=list(s.experts), router="learned", top_k=s.router_top_k))  # fmt: skip


def finetune_steps(ctx) -> int:
    from moe.model.flops import train_flops_per_token

    b, d = ctx.budget, ctx.recipe.data
    per_step = train_flops_per_token(trimmed_config(ctx), d.seq_len) * b.tokens_per_step
    return max(1, round(b.monolith_flops_after_seed / per_step))


def _trim(ctx, e: str) -> None:
    from moe.surgery.prune import prune_checkpoint

    p = ctx.recipe.prune
    prune_checkpoint(ctx.model_dir("seed"), ctx.model_dir(f"trim-{e}"), ffn=p.trim_ffn, by=e,
                     method=p.trim_method, domains=[e], seed=ctx.recipe.seed, overwrite=True,
                     progress=False)  # fmt: skip


def _assemble(ctx) -> None:
    from moe.surgery.experts import assemble_checkpoints

    s, r = ctx.study, ctx.recipe
    assemble_checkpoints(
        [ctx.model_dir(f"trim-{e}") for e in s.experts], ctx.model_dir("trimmed"),
        experts=list(s.experts), shared="base", base=ctx.model_dir("seed"), router="learned",
        top_k=s.router_top_k, router_init=s.router_init, seed=r.seed, overwrite=True,
    )  # fmt: skip


@register
class Trimmed(Arm):
    name = "trimmed"
    label = "trimmed specialists (MoE)"
    description = "the seed pruned per domain into experts, assembled, MoE fine-tuned"
    order = 101  # right after the seed: where its row has always been
    requires = ("seed",)

    def stages(self, ctx):
        s, b, r = ctx.study, ctx.budget, ctx.recipe
        out = [StageSpec(f"trim-{e}", "split", ("seed",), lambda e=e: _trim(ctx, e))
               for e in s.experts]  # fmt: skip
        out.append(StageSpec("trimmed", "assemble", tuple(f"trim-{e}" for e in s.experts),
                             lambda: _assemble(ctx)))  # fmt: skip
        steps = finetune_steps(ctx)
        out.append(StageSpec(
            "trimmed-moe", "train", ("trimmed",),
            lambda: ctx.train("trimmed-moe", "router", steps, init=ctx.model_dir("trimmed"),
                              seed=r.seed + 600, lr=s.router_lr),
            steps=steps, tokens=steps * b.tokens_per_step,
        ))  # fmt: skip
        return out

    def models(self, ctx):
        return [ModelSpec("trimmed-moe", self.label, ("seed", "trimmed-moe"),
                          checkpoint="trimmed-moe", role="moe")]  # fmt: skip
