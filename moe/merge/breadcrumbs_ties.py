"""Model Breadcrumbs with TIES' sign election (Davari & Belilovsky 2023; Yadav et al. 2023).

    δ̂_i      breadcrumbs' sparsified task vector (breadcrumbs.py: drop the lowest and the
             ⌊gamma·n⌋ highest magnitudes, keep ⌊density·n⌋)
    merged = base + λ · Σ_i w_i δ̂_i [sign δ̂_i = γ] / Σ_i w_i [sign δ̂_i = γ],  γ = sign(Σ_i w_i δ̂_i)
normalize defaults to false (mergekit's): the disjoint sum, without the division.
"""

from __future__ import annotations

import torch

from moe.merge.breadcrumbs import PARAMS, sparsified
from moe.merge.registry import MethodParams, register
from moe.merge.ties import elect_and_merge


@register("breadcrumbs_ties", needs_base=True, normalize_default=False, uses_density=True,
          params=PARAMS)  # fmt: skip
def breadcrumbs_ties(
    base: torch.Tensor | None, tensors: list[torch.Tensor], p: MethodParams
) -> torch.Tensor:
    return base + p.scale * elect_and_merge(sparsified(base, tensors, p), p.weights, p.normalize)
