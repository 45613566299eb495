"""Top-k magnitude sparsification: keep the ceil(density × numel) largest |δ| of each tensor.

As in TIES-Merging's trim step (Yadav et al. 2023, arXiv:2306.01708) and the sparse fine-tune
deltas of DeltaZip / "Delta compression" work: a fine-tune's update concentrates in few entries.
Ties in |δ| go to the lower position, so the result is deterministic (delta/primitives.py).
"""

from __future__ import annotations

import torch

from moe.delta.primitives import keep_count, topk_keep
from moe.delta.registry import Coded, register


@register("topk", "structure", "float", "Yadav et al. 2023 (TIES trim), arXiv:2306.01708")
def topk(delta: torch.Tensor, density: float, gen: torch.Generator | None = None) -> Coded:
    flat = delta.reshape(-1)
    k = keep_count(flat.numel(), density)
    idx = topk_keep(flat.abs(), k).nonzero().reshape(-1)  # (k,) kept positions, ascending
    return Coded("sparse", tuple(delta.shape), {"v": flat[idx]}, idx, {"density": density})
