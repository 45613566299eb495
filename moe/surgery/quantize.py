"""Unstructured magnitude pruning and simulated int8/int4 weight quantization, with the bytes the
weights would really take (the compression study's x axis).

Simulated: the checkpoint keeps float32 tensors holding exactly the values the compressed
format represents (zeros where pruned, dequantized values where quantized), so every tool
(eval, train, merge, export) runs on it unchanged; `meta.json`'s `prune.compression` records
the format and its true size.

Tensors: the matmul weights (attention, FFN and experts, token embedding, output head, router)
are compressed; RMSNorm gains and biases stay 16-bit (a few hundred numbers).

    unstructured f   per tensor, the round(f * n) weights of smallest |w| set to 0 (magnitude
                     pruning, Han et al. 2015); stored as a bitmap (1 bit per weight) plus the
                     surviving values
    bits 8 | 4       symmetric round-to-nearest per group of `group` consecutive weights along
                     the last axis: w ≈ s · q, q in [-(2^(b-1) - 1), 2^(b-1) - 1], s = max|w| /
                     qmax in fp16 (2 bytes per group)
    bits 16          float16 storage, the unquantized reference (2 bytes per weight)

Bytes = sum over compressed tensors of (kept values · bits / 8 + groups · 2 + bitmap) + 2 per
other parameter. Pruned-then-quantized groups count every group (a group of zeros still has a
scale).
"""

from __future__ import annotations

import math

import torch

from moe.config import ConfigError, ModelConfig
from moe.delta.primitives import absmax_scale, dequantize, quantize_symmetric

SCALE_BYTES = 2  # an fp16 scale per group


def is_matrix(name: str, t: torch.Tensor) -> bool:
    """A matmul weight (compressed); norm gains and biases are not."""
    return t.dim() >= 2 and not name.endswith("norm.weight")


def magnitude_prune(t: torch.Tensor, frac: float) -> torch.Tensor:
    """The round(frac * n) entries of smallest |w| zeroed (ties: lower flat index first)."""
    k = int(round(frac * t.numel()))
    if k == 0:
        return t.clone()
    flat = t.flatten()
    order = torch.argsort(flat.abs().double(), stable=True)
    out = flat.clone()
    out[order[:k]] = 0.0
    return out.view(t.shape)


def quantize_dequantize(t: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric per-group round-to-nearest; returns the dequantized tensor (same shape/dtype).
    The last axis is padded to a multiple of `group` (pad values are never read back). The
    arithmetic is moe/delta/primitives.py's (per group and fp16 scales here, where a delta's
    values take one float32 scale per array)."""
    qmax = 2 ** (bits - 1) - 1
    shape, n = t.shape, t.shape[-1]
    pad = (-n) % group
    x = t.double().reshape(-1, n)
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[0], pad)], dim=1)
    g = x.view(x.shape[0], -1, group)  # (rows, groups, group)
    scale = absmax_scale(g, qmax, -1, torch.float16).double()  # (rows, groups, 1), stored in fp16
    q = quantize_symmetric(g, scale, qmax)  # an all-zero group: scale 0, q 0
    deq = dequantize(q, scale).view(x.shape[0], -1)[:, :n]
    return deq.reshape(shape).to(t.dtype)


def tensor_bytes(t: torch.Tensor, bits: int, group: int, sparse: bool) -> float:
    """Storage of one compressed tensor: values, group scales, and a bitmap when pruned."""
    n = t.numel()
    kept = int((t != 0).sum()) if sparse else n
    b = kept * bits / 8
    if bits < 16:
        b += math.ceil(t.shape[-1] / group) * (n // t.shape[-1]) * SCALE_BYTES
    if sparse:
        b += math.ceil(n / 8)
    return b


def compress_state(cfg: ModelConfig, sd: dict[str, torch.Tensor], unstructured: float = 0.0,
                   bits: int = 16, group: int = 32) -> tuple[dict[str, torch.Tensor], dict]:
    """(the compressed state dict, {bits, group, unstructured, bytes, bytes_fp16, params})."""
    if bits not in (16, 8, 4):
        raise ConfigError(f"bits {bits}: choose 16 (no quantization), 8 or 4")
    if not (math.isfinite(unstructured) and 0.0 <= unstructured < 1.0):
        raise ConfigError(f"unstructured {unstructured}: a fraction in [0, 1) is needed")
    if group < 1:
        raise ConfigError(f"group {group}: at least 1")
    out, total, params = {}, 0.0, 0
    for name, t in sd.items():
        params += t.numel()
        if not is_matrix(name, t):
            out[name] = t.clone()
            total += 2 * t.numel()
            continue
        w = magnitude_prune(t, unstructured) if unstructured else t.clone()
        if bits < 16:
            w = quantize_dequantize(w, bits, group)
        out[name] = w
        total += tensor_bytes(w, bits, group, unstructured > 0)
    return out, {"bits": bits, "group": group if bits < 16 else None,
                 "unstructured": unstructured, "bytes": total, "bytes_fp16": 2 * params,
                 "params": params}  # fmt: skip


def state_bytes(sd: dict[str, torch.Tensor]) -> float:
    """Bytes of an uncompressed state dict stored in float16 (the reference size)."""
    return 2.0 * sum(t.numel() for t in sd.values())
