"""Grouped GEMM: rows offsets[e]:offsets[e+1] of x times w[e], forward and backward.

Shape legend: N rows of the grouped operand (T*K for the MoE layer), D input dim, F output
dim, E experts (groups), E1 = E + 1, S split factor of the dW reduction, T tokens.

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

from ._common import HAS_TRITON, INTERPRET, next_pow2, require_triton, tl, triton

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
    if not offsets.is_cuda:
        # Host-side checks are free on CPU; on CUDA they would synchronise, so skip them.
        o = offsets.tolist()
        if o[0] != 0 or o[-1] != x_ND.shape[0] or any(b < a for a, b in zip(o, o[1:])):
            raise ValueError(
                f"{what}: offsets must be non-decreasing from 0 to N={x_ND.shape[0]}; got "
                f"{o if len(o) <= 10 else o[:5] + ['...'] + o[-3:]}"
            )


# --------------------------------------------------------------------------- triton kernels

if HAS_TRITON:
    if INTERPRET:
        # The interpreter cannot autotune over several configs; one small config (tl.dot
        # needs every block dim >= 16).
        _FWD_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32})]
        _DW_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_D": 32, "BLOCK_F": 32})]
    else:  # pragma: no cover - needs a GPU
        _FWD_CONFIGS = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w,
                          num_stages=s)
            for bm, bn, bk, w, s in [
                (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
                (128, 64, 64, 4, 4), (64, 64, 64, 4, 3), (128, 128, 32, 4, 4),
            ]
        ]
        _DW_CONFIGS = [
            triton.Config({"BLOCK_M": bm, "BLOCK_D": bd, "BLOCK_F": bf}, num_warps=w,
                          num_stages=s)
            for bm, bd, bf, w, s in [
                (64, 128, 128, 8, 3), (32, 128, 128, 8, 4), (64, 128, 64, 4, 4),
                (64, 64, 128, 4, 4), (32, 64, 64, 4, 3),
            ]
        ]

    @triton.autotune(configs=_FWD_CONFIGS, key=["D", "F", "E"])
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

    @triton.autotune(configs=_DW_CONFIGS, key=["D", "F", "E", "S"])
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
        for m0 in range(r0, r1, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rmask = rows < r1
            if HAS_GATHER:
                src = tl.load(gather_ptr + rows, mask=rmask, other=0).to(tl.int64)
            else:
                src = rows.to(tl.int64)
            # x loaded already transposed: (BLOCK_D, BLOCK_M).
            a = tl.load(x_ptr + src[None, :] * stride_xn + dd[:, None] * stride_xd,
                        mask=dmask[:, None] & rmask[None, :], other=0.0)
            b = tl.load(dy_ptr + rows[:, None].to(tl.int64) * stride_yn + ff[None, :] * stride_yf,
                        mask=rmask[:, None] & fmask[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        # Experts (or splits) without rows store exact zeros.
        w_ptrs = (dw_ptr + s.to(tl.int64) * stride_ws + e.to(tl.int64) * stride_we
                  + dd[:, None] * stride_wd + ff[None, :] * stride_wf)
        tl.store(w_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=dmask[:, None] & fmask[None, :])


# --------------------------------------------------------------------------- launchers


def grouped_mm_triton(x_MD: torch.Tensor, w_EDF: torch.Tensor, offsets: torch.Tensor,
                      gather_N: torch.Tensor | None = None) -> torch.Tensor:
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
    gather = gather_N if gather_N is not None else offsets  # dummy pointer when unused

    def grid(meta):
        # Upper bound on row tiles: every expert may waste one partial tile.
        return (triton.cdiv(N, meta["BLOCK_M"]) + E, triton.cdiv(F, meta["BLOCK_N"]))

    _grouped_mm_kernel[grid](
        x_MD, w_EDF, y_NF, offsets, gather,           # in, in, out, in, in
        D, F, E,                                      # sizes
        x_MD.stride(0), x_MD.stride(1),               # x strides
        w_EDF.stride(0), w_EDF.stride(1), w_EDF.stride(2),  # w strides
        y_NF.stride(0), y_NF.stride(1),               # y strides
        HAS_GATHER=gather_N is not None, IEEE=x_MD.dtype == torch.float32,
        E_PAD=max(16, next_pow2(E)),
    )
    return y_NF


def _dw_split(E: int, D: int, F: int, device: torch.device) -> int:
    """How many programs share one expert's rows. From shapes only (no data), sized so that
    even if every row went to one expert its (D, F) tiles alone would fill the machine."""
    if INTERPRET or device.type != "cuda":
        return 2  # exercise the split path in the interpreter tests
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles_one_expert = triton.cdiv(D, 128) * triton.cdiv(F, 128)
    split = triton.cdiv(2 * sms, max(1, tiles_one_expert))
    # Cap the fp32 partial buffer at ~4 GiB and at 8 ways.
    cap = max(1, (4 << 30) // max(1, 4 * E * D * F))
    return int(max(1, min(8, split, cap)))


def grouped_dw_triton(x_MD: torch.Tensor, dy_NF: torch.Tensor, offsets: torch.Tensor,
                      gather_N: torch.Tensor | None = None, split: int | None = None
                      ) -> torch.Tensor:
    """dw[e] = sum over rows r of expert e of outer(x[gather[r]], dy[r]); shape (E, D, F)."""
    require_triton(x_MD, "grouped_mm backward")
    E = offsets.numel() - 1
    D, F = x_MD.shape[1], dy_NF.shape[1]
    S = split if split is not None else _dw_split(E, D, F, x_MD.device)
    if S == 1:
        dw_SEDF = torch.empty(1, E, D, F, dtype=x_MD.dtype, device=x_MD.device)
    else:
        dw_SEDF = torch.empty(S, E, D, F, dtype=torch.float32, device=x_MD.device)
    if dw_SEDF.numel() == 0:
        return dw_SEDF.sum(0).to(x_MD.dtype)
    gather = gather_N if gather_N is not None else offsets  # dummy pointer when unused

    def grid(meta):
        return (E * triton.cdiv(D, meta["BLOCK_D"]) * triton.cdiv(F, meta["BLOCK_F"]), S)

    _grouped_dw_kernel[grid](
        x_MD, dy_NF, dw_SEDF, offsets, gather,        # in, in, out, in, in
        D, F, E, S,                                   # sizes, split factor
        x_MD.stride(0), x_MD.stride(1),               # x strides
        dy_NF.stride(0), dy_NF.stride(1),             # dy strides
        dw_SEDF.stride(0), dw_SEDF.stride(1), dw_SEDF.stride(2), dw_SEDF.stride(3),
        HAS_GATHER=gather_N is not None, IEEE=x_MD.dtype == torch.float32,
    )
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
