"""BitDelta: each delta entry stored as its sign, times one per-tensor scale.

Liu et al. 2024, "BitDelta: Your Fine-Tune May Only Be Worth One Bit" (arXiv:2402.10193):
δ̂ = α · sign(δ) with α = mean|δ| (the L2-optimal scale for a fixed sign pattern). Here α is the
mean over the entries stored (all of them, or the kept ones after topk/dare); the paper's
optional distillation of α is not done. Signs are packed 8 per byte; sign(0) is stored as +.
"""

from __future__ import annotations

import torch

from moe.delta.registry import register


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool (n,) -> uint8 (ceil(n/8),), bit j of byte i = bits[8i + j]."""
    n = bits.numel()
    pad = (-n) % 8
    b = torch.cat([bits.reshape(-1), bits.new_zeros(pad)]).to(torch.uint8).reshape(-1, 8)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
    return (b * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (ceil(n/8),) -> bool (n,)."""
    shifts = torch.arange(8, dtype=torch.int32)
    return ((packed.to(torch.int32)[:, None] >> shifts) & 1).reshape(-1)[:n].bool()


def _decode(c: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
    neg = unpack_bits(c["sign"], numel)
    return torch.where(neg, -1.0, 1.0).double() * c["scale"].double()


@register("bitdelta", "values", "", "Liu et al. 2024, arXiv:2402.10193", decode=_decode)
def bitdelta(x: torch.Tensor) -> dict[str, torch.Tensor]:
    alpha = x.abs().double().mean() if x.numel() else torch.zeros((), dtype=torch.float64)
    return {"sign": pack_bits(x.reshape(-1) < 0), "scale": alpha.float().reshape(1)}
