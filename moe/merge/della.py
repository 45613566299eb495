"""DELLA: drop task-vector entries with probabilities ranked by magnitude, rescale, elect signs.

Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
Sampling" (arXiv:2406.11617); mergekit's `della_magprune` and parameter names. For each model i
(density ρ, epsilon ε), in each row of δ_i (the entries along dim 1; a 1-D tensor is one row)
of C entries, with r = 0..C-1 an entry's rank by |δ| ascending (equal magnitudes: the earlier
position ranks lower):

    p_keep = ρ - ε + 2ε · r / (C - 1)          (C = 1: ρ - ε)
    δ̃      = δ ⊙ Bernoulli(p_keep) / p_keep    (rescale: true, the default; no division if false)
    della         δ̃_i then TIES' sign election and disjoint mean (ties.py), λ, base added
    della_linear  merged = base + λ Σ_i w_i δ̃_i   (÷ Σ_i w_i with normalize: true)
ρ = 1 leaves δ_i unchanged. The draws of model i on tensor `name` come from the generator seeded
by (seed, name, i), as DARE's: the same seed gives the same merge.
"""

from __future__ import annotations

import torch

from moe.config import ConfigError
from moe.merge.registry import (
    MethodParams,
    Param,
    register,
    task_vectors,
    tensor_generator,
)
from moe.merge.ties import elect_and_merge

EPSILON = 0.15  # mergekit's default
PARAMS = (
    Param("epsilon", EPSILON, lambda e: 0.0 <= e < 1.0, "in [0, 1)", per_model=True),
    Param("rescale", True),
)


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """p_keep of every entry (the shape of `delta`): ρ - ε + 2ε · (rank within its row)/(C-1)."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    c = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    rank = torch.empty_like(order)
    pos = torch.arange(c).view(1, c, *([1] * (rows.dim() - 2)))  # 0..C-1 along dim 1
    rank.scatter_(1, order, pos.expand_as(order).contiguous())
    frac = rank.to(delta.dtype) / (c - 1) if c > 1 else torch.zeros_like(rows)
    return (density - epsilon + 2 * epsilon * frac).reshape(delta.shape)


def magprune(delta: torch.Tensor, density: float, epsilon: float, rescale: bool,
             gen: torch.Generator, name: str = "") -> torch.Tensor:  # fmt: skip
    if density >= 1.0:
        return delta.clone()
    if density - epsilon < 0.0 or density + epsilon > 1.0:
        raise ConfigError(f"della: tensor {name}: density {density} ± epsilon {epsilon} leaves "
                          "[0, 1]; lower epsilon")  # fmt: skip
    p = keep_probabilities(delta, density, epsilon)
    keep = torch.rand(delta.shape, generator=gen, dtype=delta.dtype) < p
    kept = delta / p if rescale else delta
    return torch.where(keep, kept, torch.zeros_like(delta))


def pruned(base: torch.Tensor | None, tensors: list[torch.Tensor], p: MethodParams):
    eps, rescale = p.per_model("epsilon", EPSILON), bool(p.get("rescale", True))
    return [
        magprune(d, rho, e, rescale, tensor_generator(p.seed, p.name, i), p.name)
        for i, (d, rho, e) in enumerate(zip(task_vectors(base, tensors), p.densities, eps))
    ]


def check_epsilon(c, bad) -> None:
    """density ± epsilon in [0, 1] for every model whose density is below 1 (plain numbers;
    gradients and filters are checked per tensor when merged)."""
    from moe.merge.method_params import scalar_pairs

    for where, rho, eps in scalar_pairs(c, "density", "epsilon"):
        if rho < 1.0 and (rho - eps < 0.0 or rho + eps > 1.0):
            raise bad(f"{where}: density {rho} ± epsilon {eps} must stay in [0, 1]")


@register("della", needs_base=True, normalize_default=True, uses_density=True, params=PARAMS,
          check=check_epsilon)  # fmt: skip
def della(base: torch.Tensor | None, tensors: list[torch.Tensor], p: MethodParams) -> torch.Tensor:
    return base + p.scale * elect_and_merge(pruned(base, tensors, p), p.weights, p.normalize)
