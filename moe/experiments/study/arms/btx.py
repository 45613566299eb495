"""Branch-Train-MiX (Sukhbaatar et al. 2024): the branches' FFNs become the experts of one MoE
(the family's merged expert in place of its branch), then the whole MoE, router included, is
fine-tuned on the mixed stream with `moe_finetune_fraction` of the branches' FLOPs.

Shared (non-FFN) weights, `study.shared`: average (BTX: mean over the branches), seed (the
seed's, at the fork point), frozen (FlexOlmo: branches trained only their FFN, so the shared
weights are the seed's exactly). `generalist_expert` adds the seed's FFN as one more expert.
`moe_trainable: moe` fine-tunes only the FFN layers and routers (shared weights frozen);
`moe_optimizer: continue` starts the fine-tune's AdamW from the branches' moments (each expert
its branch's, the shared weights the mean or the seed's, the router zero) with a fresh schedule
whose warm-up is at most a tenth of the stage.

Every variant's assembled model, before its fine-tune, is a row of the report: what the
fine-tune adds (or repairs) is read against it. Two variants are arms of their own, beside the
recipe's `shared`: `btx_shared_seed` (the seed's shared weights) and `btx_generalist` (the seed's
FFN as one more expert).
"""

from __future__ import annotations

from moe.experiments.study.arms import Arm, ModelSpec, StageSpec, register


def expert_stages(ctx) -> list[str]:
    fam = ctx.study.finetune_family if "family" in ctx.arms else None
    return [f"merge-{e}" if e == fam else f"branch-{e}" for e in ctx.study.experts]


def _assemble(ctx, out: str, shared: str, generalist: bool) -> None:
    from moe.surgery.experts import assemble_checkpoints

    s, r = ctx.study, ctx.recipe
    use_seed = shared in ("seed", "frozen")
    assemble_checkpoints(
        [ctx.model_dir(n) for n in expert_stages(ctx)],
        ctx.model_dir(out),
        experts=list(s.experts),
        shared="base" if use_seed else "average",
        base=ctx.model_dir("seed") if use_seed else None,
        router="learned",
        top_k=s.router_top_k,
        router_init=s.router_init,
        seed=r.seed,
        overwrite=True,
        generalist=ctx.model_dir("seed") if generalist else None,
    )
    if s.moe_optimizer == "continue":
        from moe.surgery.optim_state import write_moe_adam_state

        stages = expert_stages(ctx)
        # a merged expert has no optimizer of its own: its branch's moments stand for it
        branch_of = [n if n.startswith("branch-") else f"branch-{n.split('-', 1)[1]}"
                     for n in stages]
        write_moe_adam_state(
            [ctx.resume_ckpt(n) for n in branch_of],
            ctx.model_dir(out),
            list(s.experts),
            "base" if use_seed else "average",
            base_ckpt=ctx.resume_ckpt("seed") if use_seed else None,
            generalist_ckpt=ctx.resume_ckpt("seed") if generalist else None,
            out=ctx.stages_dir / out / "adam_state.pt",
        )


def btx_stages(ctx, assembled: str, tuned: str, shared: str, generalist: bool,
               seed_offset: int) -> list[StageSpec]:
    s, b, r = ctx.study, ctx.budget, ctx.recipe
    deps = tuple(expert_stages(ctx))
    if shared in ("seed", "frozen") or generalist or s.moe_optimizer == "continue":
        deps = ("seed",) + deps
    state = ctx.stages_dir / assembled / "adam_state.pt" if s.moe_optimizer == "continue" else None
    return [
        StageSpec(assembled, "assemble", deps,
                  lambda: _assemble(ctx, assembled, shared, generalist)),
        StageSpec(
            tuned, "train", (assembled,),
            lambda: ctx.train(
                tuned, "router", b.moe_steps, init=ctx.model_dir(assembled),
                seed=r.seed + seed_offset, lr=s.router_lr, trainable=s.moe_trainable,
                optim_state=state,
            ),
            steps=b.moe_steps, tokens=b.moe_steps * b.tokens_per_step,
        ),
    ]


def btx_lineage(ctx) -> tuple[str, ...]:
    s = ctx.study
    out = ["seed"] + [f"branch-{e}" for e in s.experts]
    if "family" in ctx.arms:
        out += [f"ft-{s.finetune_family}-{k}" for k in s.finetune_seeds]
    return tuple(out)


def btx_models(ctx, assembled: str, tuned: str, label: str) -> list[ModelSpec]:
    base = btx_lineage(ctx)
    # the fine-tuned model first: the report's experts arm is the first MoE of the table
    return [
        ModelSpec(tuned, label, base + (tuned,), checkpoint=tuned, role="moe"),
        ModelSpec(assembled, f"{label}, assembled (before its fine-tune)", base,
                  checkpoint=assembled, role="moe"),
    ]


@register
class BTX(Arm):
    name = "btx"
    label = "experts (BTX MoE)"
    description = "branches assembled into one MoE, then fine-tuned whole on the mixed stream"
    order = 10
    requires = ("branches",)

    def stages(self, ctx):
        s = ctx.study
        return btx_stages(ctx, "btx", "moe", s.shared, s.generalist_expert, 500)

    def lineage(self, ctx) -> tuple[str, ...]:
        return btx_lineage(ctx)

    def models(self, ctx):
        return btx_models(ctx, "btx", "moe", self.label)


@register
class BTXSharedSeed(Arm):
    name = "btx_shared_seed"
    label = "BTX MoE, the seed's shared weights"
    description = ("BTX with the seed's attention and embeddings as the shared weights instead "
                   "of the branches' average")
    order = 12
    requires = ("btx",)

    def stages(self, ctx):
        return btx_stages(ctx, "btx-seedshared", "moe-seedshared", "seed",
                          ctx.study.generalist_expert, 510)

    def models(self, ctx):
        return btx_models(ctx, "btx-seedshared", "moe-seedshared", self.label)


@register
class BTXGeneralist(Arm):
    name = "btx_generalist"
    label = "BTX MoE + the seed as a generalist expert"
    description = "BTX with the seed's FFN as one more expert beside the domain experts"
    order = 14
    requires = ("btx",)

    def stages(self, ctx):
        return btx_stages(ctx, "btx-generalist", "moe-generalist", ctx.study.shared, True, 520)

    def models(self, ctx):
        return btx_models(ctx, "btx-generalist", "moe-generalist", self.label)
