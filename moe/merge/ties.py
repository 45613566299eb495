"""TIES merging: trim each task vector to its largest entries, elect a sign, disjoint mean.

Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023,
arXiv:2306.01708); weights and λ as in mergekit's generalized task arithmetic.

    δ_i      = θ_i - base
    trim     keep the top ⌊density_i · n⌋ entries of |δ_i| (ties broken by position), zero the rest
    elect    γ = sign(Σ_i w_i δ̂_i)  per entry
    merge    m = Σ_i w_i δ̂_i [sign δ̂_i = γ] / Σ_i w_i [sign δ̂_i = γ]   (0 where no model agrees)
    merged = base + λ m
With normalize: false the disjoint mean becomes a disjoint sum (no division).
"""

from __future__ import annotations

import torch

from moe.delta.primitives import topk_keep
from moe.merge.registry import MethodParams, register, task_vectors


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ⌊density · numel⌋ largest-magnitude entries of `delta`, zero the others."""
    n = delta.numel()
    k = int(density * n)  # floor, possibly 0 (mergekit's); a delta's top-k rounds up instead
    if k >= n:
        return delta.clone()
    if k == 0:
        return torch.zeros_like(delta)
    keep = topk_keep(delta.abs().reshape(-1), k, keep_nan=False)  # ties: the earliest positions
    return torch.where(keep.view_as(delta), delta, torch.zeros_like(delta))


def elect_and_merge(
    deltas: list[torch.Tensor], weights: list[float], normalize: bool
) -> torch.Tensor:
    """Sign election by weighted sum, then the weighted mean (or sum) of the agreeing entries."""
    elected = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        elected.add_(d, alpha=w)
    elected = torch.sign(elected)
    num, den = torch.zeros_like(elected), torch.zeros_like(elected)
    # one model at a time (not a stacked (M, ...) tensor) keeps the working set to a few tensors
    for d, w in zip(deltas, weights):
        agree = (torch.sign(d) == elected) & (d != 0)
        num.add_(torch.where(agree, d, torch.zeros_like(d)), alpha=w)
        den.add_(agree.to(den.dtype), alpha=w)
    if not normalize:
        return num
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), num)


@register("ties", needs_base=True, normalize_default=True, uses_density=True)
def ties(base: torch.Tensor | None, tensors: list[torch.Tensor], p: MethodParams) -> torch.Tensor:
    deltas = [trim(d, rho) for d, rho in zip(task_vectors(base, tensors), p.densities)]
    return base + p.scale * elect_and_merge(deltas, p.weights, p.normalize)
