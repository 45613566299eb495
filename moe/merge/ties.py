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

from moe.merge.registry import MethodParams, register, task_vectors


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ⌊density · numel⌋ largest-magnitude entries of `delta`, zero the others."""
    n = delta.numel()
    k = int(density * n)
    if k >= n:
        return delta.clone()
    flat = delta.reshape(-1)
    keep = torch.zeros(n, dtype=torch.bool)
    if k > 0:
        # stable sort: equal magnitudes keep the earlier entry, so the result is deterministic
        order = torch.sort(flat.abs(), descending=True, stable=True).indices
        keep[order[:k]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).view_as(delta)


def elect_and_merge(
    deltas: list[torch.Tensor], weights: list[float], normalize: bool
) -> torch.Tensor:
    """Sign election by weighted sum, then the weighted mean (or sum) of the agreeing entries."""
    stacked = torch.stack(deltas)  # (M, ...)
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, *([1] * deltas[0].dim()))
    weighted = stacked * w
    elected = torch.sign(weighted.sum(0))  # (...)
    agree = (torch.sign(stacked) == elected) & (stacked != 0)  # (M, ...)
    num = (weighted * agree).sum(0)
    if not normalize:
        return num
    den = (w * agree).sum(0)
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), 0.0)


@register("ties", needs_base=True, normalize_default=True, uses_density=True)
def ties(base: torch.Tensor | None, tensors: list[torch.Tensor], p: MethodParams) -> torch.Tensor:
    deltas = [trim(d, rho) for d, rho in zip(task_vectors(base, tensors), p.densities)]
    return base + p.scale * elect_and_merge(deltas, p.weights, p.normalize)
