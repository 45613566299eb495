"""Grouped GEMM: rows offsets[e]:offsets[e+1] of x times w[e], forward and backward.

Shapes follow the legend in moe_kernels/__init__.py: N rows of the grouped operand (T*K for
the MoE layer), M rows of a gathered input, D input dim, F output dim (the model and hidden
dims for h = x @ w1, the other way round for o = a @ w2), E experts (groups), E1 = E + 1,
S ways the dW reduction is split, T tokens.

Layers: @triton.jit kernels -> launchers (grouped_mm_triton, grouped_dw_triton) -> torch
fallbacks beside them (grouped_mm_torch, grouped_dw_torch; also the CPU implementation) ->
autograd Function -> public grouped_mm. References: reference.grouped_mm_ref/grouped_dw_ref.

The forward kernel can gather its rows of x through an index (row r of the group reads
x[gather[r]]), so the MoE layer never materialises a permuted (padded or not) copy of x.
Tiles are mapped to experts inside the kernel from the device offsets; the grid is sized by
the upper bound cdiv(N, BLOCK_M) + E, so nothing is read back to the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf

from ._common import HAS_TRITON, next_pow2, require_triton, tl, triton
from ._launch import Config, Launch, device_arch, device_sms, run, smem_limit

# --------------------------------------------------------------------------- validation


def check_grouped_args(x_ND: torch.Tensor, w_EDF: torch.Tensor, offsets: torch.Tensor,
                       what: str = "grouped_mm") -> None:
    if not isinstance(x_ND, torch.Tensor) or x_ND.ndim != 2:
        raise ValueError(f"{what}: x_ND must be 2-D (N, D); got shape {tuple(x_ND.shape)}")
    if not isinstance(w_EDF, torch.Tensor) or w_EDF.ndim != 3:
        raise ValueError(f"{what}: w_EDF must be 3-D (E, D, F); got shape {tuple(w_EDF.shape)}")
    if x_ND.shape[1] != w_EDF.shape[1]:
        raise ValueError(
            f"{what}: D mismatch: x_ND has D={x_ND.shape[1]} but w_EDF has D={w_EDF.shape[1]}"
        )
    if x_ND.dtype != w_EDF.dtype:
        raise ValueError(f"{what}: x_ND is {x_ND.dtype} but w_EDF is {w_EDF.dtype}")
    if x_ND.device != w_EDF.device:
        raise ValueError(f"{what}: x_ND on {x_ND.device} but w_EDF on {w_EDF.device}")
    if not isinstance(offsets, torch.Tensor) or offsets.ndim != 1:
        raise ValueError(f"{what}: offsets must be a 1-D int32 tensor of length E+1")
    if offsets.dtype != torch.int32:
        raise ValueError(f"{what}: offsets must be int32; got {offsets.dtype}")
    if offsets.numel() != w_EDF.shape[0] + 1:
        raise ValueError(
            f"{what}: offsets must have length E+1={w_EDF.shape[0] + 1}; got {offsets.numel()}"
        )
    if offsets.device != x_ND.device:
        raise ValueError(f"{what}: offsets on {offsets.device} but x_ND on {x_ND.device}")
    if offsets.device.type == "cpu":
        # Host-side checks are free on CPU; on a device they would synchronise: skip them.
        o = offsets.tolist()
        if o[0] != 0 or o[-1] != x_ND.shape[0] or any(b < a for a, b in zip(o, o[1:])):
            raise ValueError(
                f"{what}: offsets must be non-decreasing from 0 to N={x_ND.shape[0]}; got "
                f"{o if len(o) <= 10 else o[:5] + ['...'] + o[-3:]}"
            )


# --------------------------------------------------------------------------- triton kernels

if HAS_TRITON:

    @triton.jit
    def _grouped_mm_kernel(
        x_ptr, w_ptr, y_ptr, offsets_ptr, gather_ptr,
        D, F, E,
        stride_xn, stride_xd, stride_we, stride_wd, stride_wf, stride_yn, stride_yf,
        HAS_GATHER: tl.constexpr, IEEE: tl.constexpr, E_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        # Map this row tile to its expert from the device offsets: expert e owns
        # cdiv(count_e, BLOCK_M) consecutive tiles. Surplus programs (the grid is an upper
        # bound) find e == E and do nothing.
        eidx = tl.arange(0, E_PAD)
        starts = tl.load(offsets_ptr + eidx, mask=eidx < E, other=0)
        ends = tl.load(offsets_ptr + eidx + 1, mask=eidx < E, other=0)
        ntiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
        tile_end = tl.cumsum(ntiles, 0)
        e = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
        if e < E:
            sel = eidx == e
            tile0 = tl.sum(tl.where(sel, tile_end - ntiles, 0), 0)
            row0 = tl.sum(tl.where(sel, starts, 0), 0)
            row1 = tl.sum(tl.where(sel, ends, 0), 0)
            rows = row0 + (pid_m - tile0) * BLOCK_M + tl.arange(0, BLOCK_M)
            rmask = rows < row1
            if HAS_GATHER:
                src = tl.load(gather_ptr + rows, mask=rmask, other=0).to(tl.int64)
            else:
                src = rows.to(tl.int64)
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            cmask = cols < F
            kk = tl.arange(0, BLOCK_K)
            x_ptrs = x_ptr + src[:, None] * stride_xn + kk[None, :] * stride_xd
            w_ptrs = (w_ptr + e.to(tl.int64) * stride_we + kk[:, None] * stride_wd
                      + cols[None, :] * stride_wf)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # fp32 accumulate
            for k0 in range(0, D, BLOCK_K):
                kmask = (k0 + kk) < D
                a = tl.load(x_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
                if IEEE:
                    # fp32 inputs: full precision, not tf32.
                    acc = tl.dot(a, b, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc)
                x_ptrs += BLOCK_K * stride_xd
                w_ptrs += BLOCK_K * stride_wd
            y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_yn + cols[None, :] * stride_yf
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty),
                     mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _grouped_dw_kernel(
        x_ptr, dy_ptr, dw_ptr, offsets_ptr, gather_ptr,
        D, F, E, S,
        stride_xn, stride_xd, stride_yn, stride_yf,
        stride_ws, stride_we, stride_wd, stride_wf,
        HAS_GATHER: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    ):
        # dw[s, e] = x[rows of split s of e]^T @ dy[same rows]. Splitting an expert's rows
        # over S programs keeps a hot expert from serialising on a few tiles; the S partials
        # are summed afterwards in a fixed order (no float atomics: deterministic).
        pid = tl.program_id(0)
        s = tl.program_id(1)
        tiles_d = tl.cdiv(D, BLOCK_D)
        tiles_f = tl.cdiv(F, BLOCK_F)
        e = pid // (tiles_d * tiles_f)
        rem = pid % (tiles_d * tiles_f)
        pid_d = rem // tiles_f
        pid_f = rem % tiles_f
        start = tl.load(offsets_ptr + e)
        end = tl.load(offsets_ptr + e + 1)
        per_split = tl.cdiv(tl.cdiv(end - start, S), BLOCK_M) * BLOCK_M
        r0 = start + s * per_split
        r1 = tl.minimum(r0 + per_split, end)
        dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        ff = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        dmask = dd < D
        fmask = ff < F
        acc = tl.zeros((BLOCK_D, BLOCK_F), dtype=tl.float32)  # fp32 accumulate
        # The gather index of a row block is loaded one iteration ahead of the rows it
        # addresses. Loaded in the same iteration (index, then x through it), triton's
        # pipeliner gives the index load a stage of its own and keeps num_stages - 2 x/dy
        # buffers (1 on sm_80 at num_stages=4: no overlap); one iteration ahead, the x and dy
        # tiles get the full pipeline (3 buffers on sm_80, 4 on sm_90).
        rows = r0 + tl.arange(0, BLOCK_M)
        if HAS_GATHER:
            src = tl.load(gather_ptr + rows, mask=rows < r1, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        for m0 in range(r0, r1, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rmask = rows < r1
            # x loaded already transposed: (BLOCK_D, BLOCK_M).
            a = tl.load(x_ptr + src[None, :] * stride_xn + dd[:, None] * stride_xd,
                        mask=dmask[:, None] & rmask[None, :], other=0.0)
            b = tl.load(dy_ptr + rows[:, None].to(tl.int64) * stride_yn + ff[None, :] * stride_yf,
                        mask=rmask[:, None] & fmask[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            nxt = rows + BLOCK_M
            if HAS_GATHER:
                src = tl.load(gather_ptr + nxt, mask=nxt < r1, other=0).to(tl.int64)
            else:
                src = nxt.to(tl.int64)
        # Experts (or splits) without rows store exact zeros.
        w_ptrs = (dw_ptr + s.to(tl.int64) * stride_ws + e.to(tl.int64) * stride_we
                  + dd[:, None] * stride_wd + ff[None, :] * stride_wf)
        tl.store(w_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=dmask[:, None] & fmask[None, :])


# --------------------------------------------------------------------------- configs

# Tile configs, chosen from shapes, dtype and architecture only (see _launch: no autotuning).
# Checked offline by tools/gpu_compile_report.py (compiles, registers, spills, shared memory,
# tensor cores per architecture) and tests/kernels/test_gpu_compile.py. Tile names are GEMM's,
# not the shape legend's: BLOCK_M rows of the grouped operand, BLOCK_N output columns, BLOCK_K
# the reduced dim; for dW, BLOCK_M is the reduced dim (rows).
# 16-bit inputs run on tensor cores (HMMA on sm_80, wgmma on sm_90, tcgen05 on sm_100);
# wgmma needs BLOCK_M >= 64 per warpgroup, so no tile here is shorter than 64 rows.
# fp32 inputs use input_precision="ieee" (full fp32, no tf32): FMA, not tensor cores, so their
# tiles are sized for registers instead.
MM_TILES = {
    # (class): (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    ("tc", "large"): (128, 128, 64, 8, 4),
    ("tc", "short"): (64, 128, 64, 4, 4),   # few rows per expert
    ("tc", "narrow"): (128, 64, 64, 4, 4),  # N <= 64
    ("tc", "small"): (64, 64, 64, 4, 4),
    # D or F not a multiple of 16: no 16-divisible strides for triton to specialise on, so
    # every element is loaded on its own (no vector loads, no cp.async); larger tiles spill.
    ("tc", "unaligned"): (64, 64, 32, 4, 3),
    ("fma", "large"): (64, 64, 16, 8, 3),
    ("fma", "short"): (64, 64, 16, 8, 3),
    ("fma", "narrow"): (64, 64, 16, 8, 3),
    ("fma", "small"): (64, 64, 16, 8, 3),
    ("fma", "unaligned"): (64, 64, 16, 8, 3),
}
DW_TILES = {
    # (class): (BLOCK_M, BLOCK_D, BLOCK_F, num_warps, num_stages)
    ("tc", "large"): (64, 128, 128, 8, 4),
    ("tc", "narrow"): (64, 64, 64, 4, 4),
    ("tc", "unaligned"): (64, 64, 64, 4, 3),
    ("fma", "large"): (16, 64, 64, 4, 3),
    ("fma", "narrow"): (16, 64, 64, 4, 3),
    ("fma", "unaligned"): (16, 64, 64, 4, 3),
}
# The interpreter runs one small tile (tl.dot needs every block dim >= 16), so the tests'
# small shapes still span several tiles, partial tiles and several tiles per expert.
INTERP_MM = Config.of(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)
INTERP_DW = Config.of(BLOCK_M=16, BLOCK_D=32, BLOCK_F=32)


def _tile_class(dtype: torch.dtype) -> str:
    return "tc" if dtype in (torch.bfloat16, torch.float16) else "fma"


def fit_stages(stages: int, stage_bytes: int, arch: int) -> int:
    """Fewest cuts to num_stages so that num_stages buffers of stage_bytes fit the arch's
    shared memory (an upper bound: sm_80 allocates num_stages - 1 buffers)."""
    while stages > 2 and stages * stage_bytes > smem_limit(arch):
        stages -= 1
    return stages


def grouped_mm_config(N: int, D: int, F: int, E: int, dtype: torch.dtype,
                      arch: int | None) -> Config:
    """Tiles of y (N, F) = x (N, D) @ w[e] (D, F) over E experts; arch None: interpreter."""
    if arch is None:
        return INTERP_MM
    rows = -(-N // max(1, E))  # mean rows per expert: a taller tile would be mostly padding
    if D % 16 or F % 16:
        size = "unaligned"
    elif rows < 128:
        size = "small" if F <= 64 else "short"
    else:
        size = "narrow" if F <= 64 else "large"
    bm, bn, bk, w, s = MM_TILES[(_tile_class(dtype), size)]
    es = dtype.itemsize
    s = fit_stages(s, (bm * bk + bk * bn) * es, arch)
    return Config.of(num_warps=w, num_stages=s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)


def grouped_dw_config(N: int, D: int, F: int, E: int, dtype: torch.dtype,
                      arch: int | None) -> Config:
    """Tiles of dw[e] (D, F) = x[rows of e]^T @ dy[rows of e]; arch None: interpreter."""
    if arch is None:
        return INTERP_DW
    size = "unaligned" if D % 16 or F % 16 else "narrow" if min(D, F) <= 64 else "large"
    bm, bd, bf, w, s = DW_TILES[(_tile_class(dtype), size)]
    es = dtype.itemsize
    s = fit_stages(s, (bd * bm + bm * bf) * es, arch)
    return Config.of(num_warps=w, num_stages=s, BLOCK_M=bm, BLOCK_D=bd, BLOCK_F=bf)


def dw_split(E: int, D: int, F: int, sms: int | None, block_d: int = 128,
             block_f: int = 128) -> int:
    """How many programs share one expert's rows. From shapes only (no data), sized so that
    even if every row went to one expert its (D, F) tiles alone would fill the machine."""
    if sms is None:
        return 2  # the interpreter: exercise the split path in its tests
    tiles_one_expert = -(-D // block_d) * -(-F // block_f)
    split = -(-2 * sms // max(1, tiles_one_expert))
    # Cap the fp32 partial buffer at ~4 GiB and at 8 ways.
    cap = max(1, (4 << 30) // max(1, 4 * E * D * F))
    return int(max(1, min(8, split, cap)))


# --------------------------------------------------------------------------- launchers


def grouped_mm_launch(x_MD: torch.Tensor, w_EDF: torch.Tensor, offsets: torch.Tensor,
                      gather_N: torch.Tensor | None, y_NF: torch.Tensor,
                      what: str = "") -> Launch:
    E, D, F = w_EDF.shape
    N = y_NF.shape[0]
    # The tiles are loaded along a unit-stride dim: triton specialises a stride of 1 to a
    # constant, which is what gives 16-byte vector loads, cp.async and a pipelined K loop.
    # Without it (a plain i32 stride) the loads are scalar, the loop is not pipelined and
    # 128x128 tiles spill (docs/benchmarks.md, GPU compile check). So other layouts are
    # copied first: x along D; w along D (a transposed view) or F.
    if x_MD.stride(1) != 1:
        x_MD = x_MD.contiguous()
    if w_EDF.stride(1) != 1 and w_EDF.stride(2) != 1:
        w_EDF = w_EDF.contiguous()
    cfg = grouped_mm_config(N, D, F, E, x_MD.dtype, device_arch(x_MD.device))
    gather = gather_N if gather_N is not None else offsets  # dummy pointer when unused
    # Upper bound on row tiles: every expert may waste one partial tile.
    grid = (-(-N // cfg["BLOCK_M"]) + E, -(-F // cfg["BLOCK_N"]))
    args = dict(
        x_ptr=x_MD, w_ptr=w_EDF, y_ptr=y_NF, offsets_ptr=offsets, gather_ptr=gather,
        D=D, F=F, E=E,
        stride_xn=x_MD.stride(0), stride_xd=x_MD.stride(1),
        stride_we=w_EDF.stride(0), stride_wd=w_EDF.stride(1), stride_wf=w_EDF.stride(2),
        stride_yn=y_NF.stride(0), stride_yf=y_NF.stride(1),
    )
    meta = dict(HAS_GATHER=gather_N is not None, IEEE=x_MD.dtype == torch.float32,
                E_PAD=max(16, next_pow2(E)), **cfg.meta())
    return Launch(_grouped_mm_kernel, grid, args, meta, cfg.num_warps, cfg.num_stages, what)


def grouped_mm_triton(x_MD: torch.Tensor, w_EDF: torch.Tensor, offsets: torch.Tensor,
                      gather_N: torch.Tensor | None = None, what: str = "") -> torch.Tensor:
    """y[r] = x[gather[r]] @ w[e(r)] (x[r] without gather); N = len(gather) or rows of x.

    w may be any strided view (a transposed weight for the backward is passed as a view).
    """
    require_triton(x_MD, "grouped_mm")
    if x_MD.ndim != 2 or w_EDF.ndim != 3 or x_MD.shape[1] != w_EDF.shape[1]:
        raise ValueError(f"grouped_mm: bad shapes x {tuple(x_MD.shape)} w {tuple(w_EDF.shape)}")
    if offsets.dtype != torch.int32 or offsets.numel() != w_EDF.shape[0] + 1:
        raise ValueError("grouped_mm: offsets must be int32 of length E+1")
    E, D, F = w_EDF.shape
    N = gather_N.numel() if gather_N is not None else x_MD.shape[0]
    y_NF = torch.empty(N, F, dtype=x_MD.dtype, device=x_MD.device)
    if N == 0 or F == 0:
        return y_NF
    if D == 0:
        return y_NF.zero_()
    run(grouped_mm_launch(x_MD, w_EDF, offsets, gather_N, y_NF, what))
    return y_NF


def grouped_dw_triton(x_MD: torch.Tensor, dy_NF: torch.Tensor, offsets: torch.Tensor,
                      gather_N: torch.Tensor | None = None, split: int | None = None,
                      what: str = "") -> torch.Tensor:
    """dw[e] = sum over rows r of expert e of outer(x[gather[r]], dy[r]); shape (E, D, F)."""
    require_triton(x_MD, "grouped_mm backward")
    if x_MD.stride(1) != 1:  # unit inner strides: see grouped_mm_launch
        x_MD = x_MD.contiguous()
    if dy_NF.stride(1) != 1:
        dy_NF = dy_NF.contiguous()
    E = offsets.numel() - 1
    N, D, F = dy_NF.shape[0], x_MD.shape[1], dy_NF.shape[1]
    cfg = grouped_dw_config(N, D, F, E, x_MD.dtype, device_arch(x_MD.device))
    S = split if split is not None else dw_split(E, D, F, device_sms(x_MD.device),
                                                  cfg["BLOCK_D"], cfg["BLOCK_F"])
    if S == 1:
        dw_SEDF = torch.empty(1, E, D, F, dtype=x_MD.dtype, device=x_MD.device)
    else:
        dw_SEDF = torch.empty(S, E, D, F, dtype=torch.float32, device=x_MD.device)
    if dw_SEDF.numel() == 0:
        return dw_SEDF.sum(0).to(x_MD.dtype)
    gather = gather_N if gather_N is not None else offsets  # dummy pointer when unused
    grid = (E * -(-D // cfg["BLOCK_D"]) * -(-F // cfg["BLOCK_F"]), S)
    args = dict(
        x_ptr=x_MD, dy_ptr=dy_NF, dw_ptr=dw_SEDF, offsets_ptr=offsets, gather_ptr=gather,
        D=D, F=F, E=E, S=S,
        stride_xn=x_MD.stride(0), stride_xd=x_MD.stride(1),
        stride_yn=dy_NF.stride(0), stride_yf=dy_NF.stride(1),
        stride_ws=dw_SEDF.stride(0), stride_we=dw_SEDF.stride(1),
        stride_wd=dw_SEDF.stride(2), stride_wf=dw_SEDF.stride(3),
    )
    meta = dict(HAS_GATHER=gather_N is not None, IEEE=x_MD.dtype == torch.float32,
                **cfg.meta())
    run(Launch(_grouped_dw_kernel, grid, args, meta, cfg.num_warps, cfg.num_stages, what))
    if S == 1:
        return dw_SEDF[0]
    # Fixed-order reduction over the splits: deterministic.
    return dw_SEDF.sum(0).to(x_MD.dtype)


# --------------------------------------------------------------------------- torch paths

_FGMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _aligned(t: torch.Tensor) -> bool:
    # torch's grouped_mm wants 16-byte aligned strides and data pointer.
    es = t.element_size()
    return t.data_ptr() % 16 == 0 and all(
        (st * es) % 16 == 0 for st, sz in zip(t.stride(), t.shape) if st != 1 and sz > 1
    )


def _use_fgmm(*ts: torch.Tensor) -> bool:
    t0 = ts[0]
    if not hasattr(nnf, "grouped_mm") or t0.dtype not in _FGMM_DTYPES:
        return False
    if t0.is_cuda and t0.dtype != torch.bfloat16:
        return False  # CUDA grouped_mm is bf16-only
    return all(_aligned(t) for t in ts)


def grouped_mm_torch(x_ND: torch.Tensor, w_EDF: torch.Tensor, offsets: torch.Tensor
                     ) -> torch.Tensor:
    """Not differentiable itself (the autograd Functions call it). F.grouped_mm when its
    dtype/alignment rules hold, else a per-expert loop over host offsets."""
    N, F = x_ND.shape[0], w_EDF.shape[2]
    if N > 0 and _use_fgmm(x_ND, w_EDF):
        try:
            return nnf.grouped_mm(x_ND, w_EDF, offs=offsets[1:])
        except RuntimeError:  # pragma: no cover - unusual layouts; fall back to the loop
            pass
    y_NF = x_ND.new_empty(N, F)
    bounds = offsets.tolist()
    for e in range(w_EDF.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.mm(x_ND[lo:hi], w_EDF[e], out=y_NF[lo:hi])
    return y_NF


def grouped_dw_torch(x_ND: torch.Tensor, dy_NF: torch.Tensor, offsets: torch.Tensor
                     ) -> torch.Tensor:
    """dw[e] = x[rows of e]^T @ dy[rows of e], (E, D, F); experts without rows get zeros."""
    E = offsets.numel() - 1
    N, D, F = x_ND.shape[0], x_ND.shape[1], dy_NF.shape[1]
    if N > 0 and _use_fgmm(x_ND, dy_NF) and x_ND.is_contiguous():
        try:
            return nnf.grouped_mm(x_ND.t(), dy_NF, offs=offsets[1:])
        except RuntimeError:  # pragma: no cover
            pass
    dw_EDF = x_ND.new_zeros(E, D, F)
    bounds = offsets.tolist()
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.mm(x_ND[lo:hi].t(), dy_NF[lo:hi], out=dw_EDF[e])
    return dw_EDF


# --------------------------------------------------------------------------- autograd


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w_EDF, offsets, use_triton):
        ctx.save_for_backward(x_ND, w_EDF, offsets)
        ctx.use_triton = use_triton
        if use_triton:
            return grouped_mm_triton(x_ND, w_EDF, offsets)
        return grouped_mm_torch(x_ND, w_EDF, offsets)

    @staticmethod
    def backward(ctx, dy_NF):
        x_ND, w_EDF, offsets = ctx.saved_tensors
        dy_NF = dy_NF.contiguous()
        dx = dw = None
        wT_EFD = w_EDF.transpose(1, 2)  # a view: the kernels take strides
        if ctx.use_triton:
            if ctx.needs_input_grad[0]:
                dx = grouped_mm_triton(dy_NF, wT_EFD, offsets)
            if ctx.needs_input_grad[1]:
                dw = grouped_dw_triton(x_ND, dy_NF, offsets)
        else:
            if ctx.needs_input_grad[0]:
                dx = grouped_mm_torch(dy_NF, wT_EFD, offsets)
            if ctx.needs_input_grad[1]:
                dw = grouped_dw_torch(x_ND.contiguous(), dy_NF, offsets)
        return dx, dw, None, None


def grouped_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, offsets: torch.Tensor,
               backend: str = "auto") -> torch.Tensor:
    """y[offsets[e]:offsets[e+1]] = x[offsets[e]:offsets[e+1]] @ w[e]. Differentiable in x, w.

    offsets: (E+1,) int32, non-decreasing from 0 to N (checked on CPU only; on CUDA a check
    would synchronise). backend: 'auto' (triton on CUDA, else torch), 'triton', 'torch',
    'loop' (same as torch here: it falls back to a per-expert loop where needed).
    """
    from ._common import resolve_backend

    check_grouped_args(x_ND, w_EDF, offsets)
    b = resolve_backend(backend, x_ND, "grouped_mm")
    if b == "loop":
        from .reference import grouped_mm_ref

        return grouped_mm_ref(x_ND, w_EDF, offsets)
    return _GroupedMM.apply(x_ND, w_EDF, offsets, b == "triton")
