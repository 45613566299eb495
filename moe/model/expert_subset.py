"""Experts at inference (FlexOlmo's opt-out): keep a subset of an MoE's experts, add one, change
top-k, in place on a model and without training. `moe eval --experts`, `moe generate --experts`
apply it in memory; `moe experts` (moe/surgery/experts_subset.py) writes the result.

What a change computes:
    drop/keep   each MoE layer keeps the rows of the kept experts (w1, w3, w2 along E, the router's
                rows, the aux-free bias), in the model's own order: the router scores the kept
                experts only, so a learned router's result is the full model's with the dropped
                experts' logits removed before the softmax (or sigmoid) and top-k; a domain router
                sends each kept domain to the same expert as before (its output unchanged) and a
                dropped domain to none.
    add         one more expert at the end: its (w1, w3, w2) per layer and, for a learned router,
                a router row per layer (zero, or a domain's mean hidden state); an aux-free bias
                starts at the mean of the others'.
    top_k       experts per token of a learned router, 1..E. Dropping below top_k experts clamps
                top_k to the experts left (said in the notes).

Shape legend: moe_kernels/__init__.py (E experts, D model dim, F expert hidden dim).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn as nn

from moe.config import ConfigError, ModelConfig
from moe.model.moe_layer import MoEFFN
from moe.model.transformer import Transformer


def moe_layers(model: Transformer) -> list[MoEFFN]:
    return [lay.ffn for lay in model.layers if isinstance(lay.ffn, MoEFFN)]


def plan_experts(
    cfg: ModelConfig,
    keep: Sequence[str] | None = None,
    drop: Sequence[str] | None = None,
    top_k: int | None = None,
    added: int = 0,
    *,
    where: str = "the model",
    keep_flag: str = "--keep",
    drop_flag: str = "--drop",
    k_flag: str = "--top-k",
) -> tuple[list[str], int, list[str]]:
    """(experts kept, in the model's order; the top-k afterwards; notes) for a change of
    `cfg`'s experts, with `added` more experts added after the subset. One-line ConfigErrors,
    naming the flag: a dense model, an unknown or repeated expert name, no expert left, top-k
    outside 1..E (or given to a domain router)."""
    m = cfg.moe
    if not m.experts:
        raise ConfigError(f"{where} is a dense model: it has no experts to choose from")
    if keep is not None and drop is not None:
        raise ConfigError(f"give {keep_flag} or {drop_flag}, not both")
    names = list(m.experts)
    given = list(keep if keep is not None else drop if drop is not None else [])
    flag = keep_flag if keep is not None else drop_flag
    for n in given:
        if n not in names:
            raise ConfigError(f"{flag} {n!r}: not an expert of {where} (experts: "
                              f"{', '.join(names)})")
    if len(set(given)) != len(given):
        raise ConfigError(f"{flag}: an expert is named twice ({', '.join(given)})")
    if keep is not None:
        kept = [n for n in names if n in given]
    else:
        kept = [n for n in names if n not in given]
    if not kept:
        raise ConfigError(f"{flag} {','.join(given)} would leave {where} no expert (keep at "
                          "least one)")
    E = len(kept) + added
    notes: list[str] = []
    if top_k is not None:
        if m.router != "learned":
            raise ConfigError(f"{k_flag}: {where} routes by domain (one expert per token); "
                              "top-k applies to a learned router")
        if not 1 <= top_k <= E:
            raise ConfigError(f"{k_flag} {top_k}: must be between 1 and the {E} experts "
                              f"{'left' if given else 'of ' + where}")
        k = top_k
    else:
        k = min(m.top_k, E)
        if k < m.top_k and m.router == "learned":
            notes.append(f"top_k {m.top_k} -> {k}: only {E} expert{'s' * (E > 1)} left")
    return kept, k, notes


def restrict_experts(model: Transformer, keep: Sequence[str], top_k: int | None = None) -> None:
    """Keep only the experts named `keep` (in the model's order) in every MoE layer, in place;
    `top_k` (default: the model's, clamped to the experts left). Check with `plan_experts`."""
    cfg = model.config
    names = list(cfg.moe.experts)
    kept = [n for n in names if n in set(keep)]
    k = min(cfg.moe.top_k, len(kept)) if top_k is None else top_k
    for ffn in moe_layers(model):
        idx = torch.tensor([names.index(n) for n in kept], device=ffn.w1.device)
        for key in ("w1", "w3", "w2"):
            p = getattr(ffn, key)
            setattr(ffn, key, nn.Parameter(p.detach()[idx].clone(), p.requires_grad))
        if ffn.router is not None:
            w = ffn.router.weight
            ffn.router.weight = nn.Parameter(w.detach()[idx].clone(), w.requires_grad)
            ffn.router.out_features = len(kept)
        if ffn.score_bias is not None:
            ffn.score_bias = ffn.score_bias[idx].clone()
            ffn.load_count = torch.zeros_like(ffn.score_bias)
        _renamed(ffn, kept, k)
    model.config = _with_experts(cfg, kept, k)


def set_top_k(model: Transformer, top_k: int) -> None:
    """Experts per token of a learned router (1..E, checked by `plan_experts`), in place."""
    for ffn in moe_layers(model):
        _renamed(ffn, ffn.expert_names, top_k)
    model.config = _with_experts(model.config, list(model.config.moe.experts), top_k)


def add_expert(
    model: Transformer,
    name: str,
    weights: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    router_rows_LD: torch.Tensor | None = None,
) -> None:
    """Append expert `name` to every MoE layer, in place: `weights[i]` = (w1_DF, w3_DF, w2_FD)
    of layer i (kernel layout), `router_rows_LD` its router row per layer (needed by a learned
    router, unused by a domain router). Its aux-free bias starts at the mean of the others'."""
    cfg = model.config
    layers = moe_layers(model)
    if name in cfg.moe.experts:
        raise ConfigError(f"an expert is already named {name!r} (experts: "
                          f"{', '.join(cfg.moe.experts)})")
    if len(weights) != len(layers):
        raise ConfigError(f"expert {name!r}: {len(weights)} layers of weights for a model of "
                          f"{len(layers)} MoE layers")
    learned = cfg.moe.router == "learned"
    if learned and router_rows_LD is None:
        raise ConfigError(f"expert {name!r}: a learned router needs a router row per layer")
    for li, (ffn, new) in enumerate(zip(layers, weights)):
        for key, t in zip(("w1", "w3", "w2"), new):
            p = getattr(ffn, key)
            if tuple(t.shape) != tuple(p.shape[1:]):
                raise ConfigError(f"expert {name!r}: layer {li} {key} is {tuple(t.shape)}, the "
                                  f"model's experts are {tuple(p.shape[1:])} (dim, "
                                  "expert_ffn_dim must agree)")
            cat = torch.cat([p.detach(), t.to(p)[None]])
            setattr(ffn, key, nn.Parameter(cat, p.requires_grad))
        if ffn.router is not None:
            w = ffn.router.weight
            row = router_rows_LD[li].to(w)
            ffn.router.weight = nn.Parameter(torch.cat([w.detach(), row[None]]), w.requires_grad)
            ffn.router.out_features += 1
        if ffn.score_bias is not None:
            b = ffn.score_bias
            ffn.score_bias = torch.cat([b, b.mean().reshape(1)])
            ffn.load_count = torch.zeros_like(ffn.score_bias)
        _renamed(ffn, ffn.expert_names + [name], ffn.top_k)
    model.config = _with_experts(cfg, list(cfg.moe.experts) + [name], cfg.moe.top_k)


def expert_weights(
    model: Transformer, expert: str | None = None
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(w1_DF, w3_DF, w2_FD) per layer of an MoE's expert `expert`, or of a dense model's FFN
    (`expert` None), in the experts' kernel layout."""
    experts = list(model.config.moe.experts)
    if not experts:
        if expert is not None:
            raise ConfigError(f"expert {expert!r}: the source is a dense model (give no expert "
                              "name to use its FFN)")
        ffns = [lay.ffn for lay in model.layers]
        return [(f.w1.weight.detach().T, f.w3.weight.detach().T, f.w2.weight.detach().T)
                for f in ffns]  # fmt: skip
    if expert is None or expert not in experts:
        raise ConfigError(f"expert {expert!r}: the source MoE's experts are {', '.join(experts)} "
                          "(name one as SOURCE:EXPERT)")
    e = experts.index(expert)
    return [(f.w1.detach()[e], f.w3.detach()[e], f.w2.detach()[e]) for f in moe_layers(model)]


def _renamed(ffn: MoEFFN, names: list[str], top_k: int) -> None:
    ffn.expert_names = list(names)
    ffn.num_experts = len(names)
    ffn.top_k = 1 if ffn.router_kind == "domain" else top_k


def _with_experts(cfg: ModelConfig, experts: list[str], top_k: int) -> ModelConfig:
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, experts=list(experts),
                                                            top_k=top_k))
