"""Task arithmetic: add the models' task vectors (θ_i - base) to the base, scaled by λ.

Ilharco et al. 2023, "Editing models with task arithmetic" (ICLR 2023, arXiv:2212.04089).

    merged = base + λ Σ_i w_i (θ_i - base)                 (normalize: false, the default)
    merged = base + λ Σ_i w_i (θ_i - base) / Σ_i w_i       (normalize: true)
"""

from __future__ import annotations

import torch

from moe.merge.registry import MethodParams, linear_combination, register, task_vectors


@register("task_arithmetic", needs_base=True, normalize_default=False)
def task_arithmetic(
    base: torch.Tensor | None, tensors: list[torch.Tensor], p: MethodParams
) -> torch.Tensor:
    return linear_combination(base, task_vectors(base, tensors), p)
