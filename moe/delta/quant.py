"""Values steps: symmetric per-array int8 / int4 quantization, and float16.

int8: q = round(x / s), s = max|x| / 127, q in [-127, 127] (one float32 scale per array).
int4: the same with 7 (q in [-7, 7]), two values per byte (low nibble first, offset by 8).
The "array" is a tensor's dense values, its kept values (after topk/dare), or one low-rank
factor. Dettmers et al. 2022 (LLM.int8(), arXiv:2208.07339) for absmax quantization;
"none" (float32) is the unquantized reference. The arithmetic is moe/delta/primitives.py's,
shared with the per-group quantization of moe/surgery/quantize.py.
"""

from __future__ import annotations

import torch

from moe.delta.primitives import absmax_scale, dequantize, quantize_symmetric
from moe.delta.registry import register


def _scale(x: torch.Tensor, qmax: int) -> torch.Tensor:
    s = absmax_scale(x, qmax)  # one float32 scale for the whole array
    return torch.where(s > 0, s, torch.ones_like(s)).reshape(1)  # (1,) an all-zero array: s = 1


def _dequant(c: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
    return dequantize(c["q"], c["scale"])


@register("int8", "values", "", "Dettmers et al. 2022, arXiv:2208.07339", decode=_dequant)
def int8(x: torch.Tensor) -> dict[str, torch.Tensor]:
    s = _scale(x, 127)
    q = quantize_symmetric(x, s, 127).to(torch.int8)
    return {"q": q, "scale": s}


def _unpack4(c: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
    b = c["q4"].to(torch.int16)
    q = torch.stack([b & 0xF, b >> 4], dim=1).reshape(-1)[:numel] - 8  # (numel,) in [-7, 7]
    return dequantize(q, c["scale"])


@register("int4", "values", "", "Dettmers et al. 2022, arXiv:2208.07339", decode=_unpack4)
def int4(x: torch.Tensor) -> dict[str, torch.Tensor]:
    s = _scale(x, 7)
    q = (quantize_symmetric(x, s, 7) + 8).to(torch.uint8).reshape(-1)
    if q.numel() % 2:
        q = torch.cat([q, q.new_full((1,), 8)])  # pad with a zero value
    packed = q[0::2] | (q[1::2] << 4)  # (ceil(numel/2),)
    return {"q4": packed, "scale": s}


@register("fp16", "values", "", "IEEE half precision", decode=lambda c, n: c["f16"].double())
def fp16(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"f16": x.to(torch.float16)}
