"""Top-k magnitude sparsification: keep the ceil(density × numel) largest |δ| of each tensor.

As in TIES-Merging's trim step (Yadav et al. 2023, arXiv:2306.01708) and the sparse fine-tune
deltas of DeltaZip / "Delta compression" work: a fine-tune's update concentrates in few entries.
Ties in |δ| are broken by position (a stable sort), so the result is deterministic.
"""

from __future__ import annotations

import math

import torch

from moe.delta.registry import Coded, register


def keep_count(numel: int, density: float) -> int:
    return max(1, min(numel, math.ceil(density * numel)))


@register("topk", "structure", "float", "Yadav et al. 2023 (TIES trim), arXiv:2306.01708")
def topk(delta: torch.Tensor, density: float, gen: torch.Generator | None = None) -> Coded:
    flat = delta.reshape(-1)
    k = keep_count(flat.numel(), density)
    order = torch.argsort(flat.abs(), descending=True, stable=True)  # (numel,)
    idx = order[:k].sort().values  # (k,) kept positions, ascending
    return Coded("sparse", tuple(delta.shape), {"v": flat[idx]}, idx, {"density": density})
