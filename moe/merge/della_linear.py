"""DELLA without sign election (Deep et al. 2024, arXiv:2406.11617; mergekit's `della_linear`).

    δ̃_i      della.py's magnitude-ranked drop and 1/p_keep rescale (density, epsilon, rescale)
    merged = base + λ Σ_i w_i δ̃_i         (÷ Σ_i w_i with normalize: true; default false)
"""

from __future__ import annotations

import torch

from moe.merge.della import PARAMS, check_epsilon, pruned
from moe.merge.registry import MethodParams, linear_combination, register


@register("della_linear", needs_base=True, normalize_default=False, uses_density=True,
          params=PARAMS, check=check_epsilon)  # fmt: skip
def della_linear(
    base: torch.Tensor | None, tensors: list[torch.Tensor], p: MethodParams
) -> torch.Tensor:
    return linear_combination(base, pruned(base, tensors, p), p)
