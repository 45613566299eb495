"""Model Breadcrumbs: drop each task vector's smallest and its largest (outlier) entries.

Davari & Belilovsky 2023, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks"
(arXiv:2312.06795); mergekit's `magnitude_outliers` sparsification with its two consensus modes.
With n entries, k = ⌊density · n⌋ kept and g = ⌊gamma · n⌋ outliers:

    order    the entries of |δ_i| ascending (equal magnitudes: the earlier position first)
    drop     the lowest b = n - k - g and the highest g  (b < 0: g ← n - k, b ← 0)
    keep     the k entries in between  (density 1: δ_i unchanged, gamma unused)
    breadcrumbs       merged = base + λ Σ_i w_i δ̂_i          (÷ Σ_i w_i with normalize: true)
    breadcrumbs_ties  δ̂_i then TIES' sign election and disjoint mean / sum (ties.py)
No rescale of the kept entries; normalize defaults to false for both, as in mergekit.
"""

from __future__ import annotations

import torch

from moe.merge.registry import MethodParams, Param, linear_combination, register, task_vectors

GAMMA = 0.01  # mergekit's default
PARAMS = (Param("gamma", GAMMA, lambda g: 0.0 <= g < 1.0, "in [0, 1)", per_model=True),)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep the ⌊density·n⌋ entries of `delta` just below its ⌊gamma·n⌋ largest magnitudes."""
    if density >= 1.0:
        return delta.clone()
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:  # too many outliers for the density: drop fewer of them
        top, bottom = top + bottom, 0
    order = torch.sort(delta.abs().reshape(-1), stable=True).indices  # ascending
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[bottom:n - top]] = True
    return torch.where(mask.view_as(delta), delta, torch.zeros_like(delta))


def sparsified(base: torch.Tensor | None, tensors: list[torch.Tensor], p: MethodParams):
    gammas = p.per_model("gamma", GAMMA)
    return [magnitude_outliers(d, rho, g)
            for d, rho, g in zip(task_vectors(base, tensors), p.densities, gammas)]  # fmt: skip


@register("breadcrumbs", needs_base=True, normalize_default=False, uses_density=True,
          params=PARAMS)  # fmt: skip
def breadcrumbs(
    base: torch.Tensor | None, tensors: list[torch.Tensor], p: MethodParams
) -> torch.Tensor:
    return linear_combination(base, sparsified(base, tensors, p), p)
