"""How a study's compute budget is shared out between its stages.

The budget is the monolith's: `budget_steps` dense steps on the mixed stream, the first
`seed_fraction` of them being the seed run every arm shares. After the fork the experts get the
monolith's remaining FLOPs: E branches of `branch_steps` each, the family's fine-tunes, and the
BTX MoE fine-tune, which spends `moe_finetune_fraction` of the branches' FLOPs (BTX Table 3 uses
about 20%). Every step has batch_size x seq_len tokens, so steps convert to tokens and FLOPs
exactly; the MoE's FLOPs per token (top-k experts active) come from its config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moe.config import ConfigError, MoEConfig, Recipe
from moe.model.flops import train_flops_per_token


@dataclass(frozen=True)
class Budget:
    total_steps: int  # the monolith: seed + continuation
    seed_steps: int
    branch_steps: int  # each of the E branches (and each random-split control branch)
    finetune_steps: int  # each fine-tune of the family (0 without the family arm)
    n_finetunes: int
    moe_steps: int  # BTX MoE fine-tune (0 without the btx arm)
    data_matched_steps: int  # the data-matched monolith: seed + the experts' post-seed tokens
    tokens_per_step: int
    dense_flops_per_step: float
    moe_flops_per_step: float

    @property
    def expert_flops_after_seed(self) -> float:
        n_branches = self.n_branches
        dense = (n_branches * self.branch_steps + self.n_finetunes * self.finetune_steps)
        return dense * self.dense_flops_per_step + self.moe_steps * self.moe_flops_per_step

    @property
    def monolith_flops_after_seed(self) -> float:
        return (self.total_steps - self.seed_steps) * self.dense_flops_per_step

    n_branches: int = 0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["expert_flops_after_seed"] = self.expert_flops_after_seed
        d["monolith_flops_after_seed"] = self.monolith_flops_after_seed
        return d


def dense_config(recipe: Recipe) -> object:
    """The seed's model config: the `init:` checkpoint's when the seed starts from one."""
    if recipe.init:
        from moe.eval.evaluate import resolve_checkpoint
        from moe.io.checkpoint import read_config

        return read_config(resolve_checkpoint(recipe.init))
    return recipe.model.resolved()


def moe_config(recipe: Recipe) -> object:
    """The model config of the assembled BTX MoE (for its FLOPs per token)."""
    s = recipe.study
    m = dense_config(recipe)
    names = list(s.experts) + (["generalist"] if s.generalist_expert else [])
    return dataclasses.replace(
        m, moe=MoEConfig(experts=names, router="learned", top_k=s.router_top_k)
    )


def plan_budget(recipe: Recipe, arms: list[str]) -> Budget:
    s, d = recipe.study, recipe.data
    tps = d.batch_size * d.seq_len
    dense = train_flops_per_token(dense_config(recipe), d.seq_len) * tps
    moe = train_flops_per_token(moe_config(recipe), d.seq_len) * tps
    total = s.budget_steps
    if s.budget_flops:
        total = round(s.budget_flops / dense)
        if total < 2:
            raise ConfigError(
                f"study.budget_flops={s.budget_flops:.3g} is less than two steps of this model "
                f"({dense:.3g} FLOPs each); raise it"
            )
    seed = max(1, round(s.seed_fraction * total))
    post = total - seed
    n_ft = len(s.finetune_seeds) if "family" in arms and s.finetune_family else 0
    ft_steps = s.finetune_steps if n_ft else 0
    m = s.moe_finetune_fraction if "btx" in arms else 0.0
    E = len(s.experts)
    # E*b*D + n_ft*ft*D + m*E*b*D = post*D  (the MoE fine-tune spends m of the branches' FLOPs)
    branch = round((post - n_ft * ft_steps) / (E * (1.0 + m)))
    if branch < 1:
        raise ConfigError(
            f"study budget of {total} steps: after the seed ({seed} steps) and the family's "
            f"fine-tunes ({n_ft} x {ft_steps} steps) no step is left for {E} branches; raise "
            "study.budget_steps (or budget_flops) or lower study.seed_fraction / "
            "study.finetune_steps"
        )
    moe_steps = 0
    if "btx" in arms:
        # the MoE fine-tune takes what the branches left of the monolith's FLOPs (about m of
        # theirs), so the two arms match to within one step's FLOPs
        left = (post - E * branch - n_ft * ft_steps) * dense
        moe_steps = max(1, round(left / moe))
    data_matched = seed + E * branch + n_ft * ft_steps + moe_steps
    return Budget(
        total_steps=total,
        seed_steps=seed,
        branch_steps=branch,
        finetune_steps=ft_steps,
        n_finetunes=n_ft,
        moe_steps=moe_steps,
        data_matched_steps=data_matched,
        tokens_per_step=tps,
        dense_flops_per_step=dense,
        moe_flops_per_step=moe,
        n_branches=E,
    )


def widened_model(recipe: Recipe, ffn_mult: int) -> object:
    """The seed's model with `ffn_mult` times its FFN width: a dense baseline with the BTX MoE's
    total parameters (ffn_mult = its experts) or its active parameters per token (top-k)."""
    m = dense_config(recipe)
    return dataclasses.replace(m, ffn_dim=m.ffn_dim * ffn_mult)


def steps_for_budget(recipe: Recipe, budget: Budget, model) -> int:
    """Steps of `model` (batch_size x seq_len tokens each) that spend the monolith's training
    FLOPs: how a baseline of another size is matched on training compute."""
    d = recipe.data
    per_step = train_flops_per_token(model, d.seq_len) * d.batch_size * d.seq_len
    return max(1, round(budget.total_steps * budget.dense_flops_per_step / per_step))
