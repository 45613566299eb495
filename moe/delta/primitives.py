"""Tensor primitives shared by delta compression (moe/delta/) and merging (moe/merge/), and the
simulated quantization of moe/surgery/quantize.py.

Where the maths is the same the code is one: the per-tensor random generator, DARE's keep mask,
the top-k magnitude keep set, and symmetric absmax quantization. Where the callers differ, they
differ on purpose, and each difference is one argument here:

- DARE: the merge (moe/merge/dare.py) draws its uniforms in the default float dtype over the
  tensor's shape, draws nothing at density ≥ 1 (the task vector as it is), and returns a dense
  tensor; the delta step (moe/delta/dare.py) draws float64 uniforms over the flattened tensor
  at every density and keeps the survivors' positions. The draws decide every mask already
  made, so each side keeps its own. Both rescale the survivors by 1/density.
- top-k: both keep the k largest |x|, ties to the lower flat position; the merge's TIES trim
  keeps k = ⌊density · n⌋ (possibly none, as in mergekit), a delta keeps k = ⌈density · n⌉, at
  least one (`keep_count`), so a stored delta never comes out empty; a NaN entry is kept by a
  delta but not by the trim (`topk_keep`'s keep_nan).
- quantization: a delta's values (moe/delta/quant.py) share one float32 scale per array, stored
  as 1 for an all-zero array; the surgery's simulated weights (moe/surgery/quantize.py) take one
  float16 scale per group of consecutive weights along the last axis, stored as 0 for an
  all-zero group. Both round to nearest (ties to even, `torch.round`) in float64 and clamp to
  [−qmax, qmax].
"""

from __future__ import annotations

import hashlib
import math

import torch


def tensor_generator(seed: int, name: str, index: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, tensor name, model index).

    Seeding per tensor (not one stream over the whole merge) makes a tensor's random mask
    independent of the order tensors are visited and of which other tensors exist.
    """
    digest = hashlib.sha256(f"{seed}\0{name}\0{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


# ----------------------------------------------------------------------------- DARE


def dare_keep_mask(shape: torch.Size | tuple[int, ...], density: float,
                   gen: torch.Generator | None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
    """DARE's Bernoulli(density) keep mask (Yu et al. 2024, arXiv:2311.03099): bool of `shape`.

    One uniform per entry, `torch.rand(shape, generator=gen, dtype=dtype)` (dtype None: the
    default float dtype), kept where it is below `density`. The dtype and the shape decide which
    numbers are drawn: a caller that changes either changes every mask it ever drew.
    """
    return torch.rand(shape, generator=gen, dtype=dtype) < density


# ----------------------------------------------------------------------------- top-k


def keep_count(numel: int, density: float) -> int:
    """A delta's top-k count: ⌈density · numel⌉, at least 1 and at most numel."""
    return max(1, min(numel, math.ceil(density * numel)))


def topk_keep(mag: torch.Tensor, k: int, *, keep_nan: bool = True) -> torch.Tensor:
    """The k largest entries of a 1-D tensor of magnitudes, as a bool mask of its shape.

    Ties go to the lower position, so the set is deterministic. A selection (`torch.kthvalue`),
    not a sort: O(n) and no index tensor, which matters on 100M+ parameter tensors. `mag` holds
    magnitudes (no -inf).

    NaN ranks above every number. keep_nan (a delta's top-k): NaN entries are kept first, as a
    stable sort would keep them. keep_nan False (the merge's TIES trim, as it has always
    merged): a NaN entry takes its place among the k largest but is never kept, and entries
    equal to the k-th largest magnitude may fill those places. Without NaN both are the same.
    """
    n = mag.numel()
    if k >= n:
        return torch.ones_like(mag, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(mag, dtype=torch.bool)
    nan = torch.isnan(mag) if keep_nan else None
    n_nan = int(nan.sum()) if nan is not None else 0
    if n_nan:
        if n_nan >= k:
            keep = torch.zeros_like(mag, dtype=torch.bool)
            keep[torch.nonzero(nan).flatten()[:k]] = True
            return keep
        # every NaN, then the k - n_nan largest numbers (NaN set below any magnitude)
        return nan | topk_keep(torch.where(nan, torch.full_like(mag, -math.inf), mag), k - n_nan)
    thr = torch.kthvalue(mag, n - k + 1).values  # the k-th largest magnitude
    keep = mag > thr
    short = k - int(keep.sum())
    if short > 0:
        # magnitudes equal to the threshold: keep the earliest ones
        keep[torch.nonzero(mag == thr).flatten()[:short]] = True
    return keep


# ----------------------------------------------------------------------------- quantization


def absmax_scale(x: torch.Tensor, qmax: int, dim: int | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """max|x| / qmax in x's dtype, then rounded to `dtype` (the stored scale).

    dim None: one scale for all of x, shape () (0 for an empty x); otherwise one per slice along
    `dim`, kept as a size-1 axis.
    """
    if dim is None:
        amax = x.abs().max() if x.numel() else x.new_zeros(())
    else:
        amax = x.abs().amax(dim, keepdim=True)
    return (amax / qmax).to(dtype)


def quantize_symmetric(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """q = round(x / scale) clamped to [−qmax, qmax], in float64 (integer values).

    `scale` broadcasts against x; a scale that is 0 (an all-zero group) or NaN divides by 1.
    """
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).double()
    return torch.clamp(torch.round(x.double() / safe), -qmax, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q · scale in float64."""
    return q.double() * scale.double()
