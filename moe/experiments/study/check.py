"""The checks of a recipe's `study:` section (`moe run`, `moe sweep`).

They live here, not in moe/config/, because they name what the layers above config register:
split methods (moe/model/split.py), merge methods (moe/merge/) and study arms (./arms/).
"""

from __future__ import annotations

from typing import Any

from moe.config import (
    DOMAINS,
    EVAL_PROTOCOLS,
    ROUTER_INITS,
    SHARED_MODES,
    STUDY_PROTOCOLS,
    ConfigError,
    Recipe,
    StudyConfig,
)
from moe.experiments.study.arms import ARMS
from moe.merge.registry import METHODS as MERGE_METHODS
from moe.model.split import SPLITS


def _check_section(s: StudyConfig, r: Recipe, bad) -> None:
    def choice(key: str, value: Any, options) -> None:
        if value not in options:
            raise bad(f"{key}: unknown value {value!r}; choose one of {', '.join(options)}")

    choice("study.protocol", s.protocol, STUDY_PROTOCOLS)
    choice("study.eval_protocol", s.eval_protocol, EVAL_PROTOCOLS)
    if s.eval_context is not None:
        if s.eval_protocol != "rolling":
            raise bad("study.eval_context belongs to study.eval_protocol=rolling")
        top = r.model.resolved().max_seq_len
        if r.init:  # the model is the init checkpoint's (checked elsewhere when missing)
            from moe.io.checkpoint import read_config, resolve_checkpoint

            try:
                top = read_config(resolve_checkpoint(r.init)).resolved().max_seq_len
            except ConfigError:
                top = None
        if s.eval_context < 1 or (top is not None and s.eval_context > top):
            raise bad(f"study.eval_context {s.eval_context}: must be between 1 and the model's "
                      f"max_seq_len ({top})")
    choice("study.shared", s.shared, SHARED_MODES)
    choice("study.split_method", s.split_method, SPLITS.names())
    choice("study.merge_method", s.merge_method, MERGE_METHODS.names())
    choice("study.router_init", s.router_init, ROUTER_INITS)
    choice("study.moe_trainable", s.moe_trainable, ("all", "moe"))
    choice("study.moe_optimizer", s.moe_optimizer, ("fresh", "continue"))
    for a in s.arms:
        choice("study.arms", a, ARMS.names())
    if len(set(s.arms)) != len(s.arms):
        raise bad("study.arms: an arm is listed twice")
    if not s.experts or len(set(s.experts)) != len(s.experts):
        raise bad("study.experts: list each expert (domain) once")
    for e in s.experts:
        if e not in DOMAINS and e not in r.data.sources:
            raise bad(f"study.experts: {e!r} is not a domain with data")
    for k in ("budget_steps", "finetune_steps", "eval_batches", "seeds"):
        if getattr(s, k) < 1:
            raise bad(f"study.{k} must be at least 1, got {getattr(s, k)}")
    if not (s.budget_flops >= 0.0 and s.budget_flops < float("inf")):
        raise bad(f"study.budget_flops must be 0 (use budget_steps) or more, got {s.budget_flops}")
    if not s.equivalence_margin >= 0.0:
        raise bad(f"study.equivalence_margin must be at least 0, got {s.equivalence_margin}")
    if s.bootstrap_iters < 100:
        raise bad(f"study.bootstrap_iters must be at least 100, got {s.bootstrap_iters}")
    if not 0.0 < s.seed_fraction < 1.0:
        raise bad(f"study.seed_fraction must be in (0, 1), got {s.seed_fraction}")
    if not 0.0 <= s.moe_finetune_fraction <= 10.0:
        raise bad(f"study.moe_finetune_fraction must be in [0, 10], got {s.moe_finetune_fraction}")
    if s.finetune_family is not None:
        if s.finetune_family not in s.experts:
            raise bad(f"study.finetune_family {s.finetune_family!r} is not one of study.experts")
        if len(s.finetune_seeds) < 2:
            raise bad("study.finetune_seeds: merging needs at least two fine-tunes")
    elif "family" in s.arms:
        raise bad("study.arms has `family` but study.finetune_family is null")
    n_experts = len(s.experts) + int(s.generalist_expert)
    if not 1 <= s.router_top_k <= n_experts:
        raise bad(f"study.router_top_k must be between 1 and {n_experts}")
    if not 0 < s.merge_density <= 1:
        raise bad(f"study.merge_density must be in (0, 1], got {s.merge_density}")
    if s.router_lr <= 0:
        raise bad(f"study.router_lr must be positive, got {s.router_lr}")



def check_recipe(r: Recipe, where: str = "recipe") -> None:
    """The checks of a recipe's `study:` section, made when it runs as a study (`moe run`,
    `moe sweep`) before anything is written; names are checked against the registries."""
    s = r.study

    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{where}: {msg}")

    _check_section(s, r, bad)
    if s.protocol == "fork":
        if r.optim.schedule == "cosine":
            raise bad(
                "study.protocol=fork needs a schedule with a stable phase to fork from; set "
                "optim.schedule=wsd (or constant), or use study.protocol=rewarm"
            )
        if SPLITS[s.split_method].partition:
            copies = ", ".join(n for n, m in SPLITS.items() if not m.partition)
            raise bad(
                f"study.split_method={s.split_method} partitions the FFN, so a branch is not the "
                f"seed run and cannot fork from it; use split_method={copies} or "
                "study.protocol=rewarm"
            )
