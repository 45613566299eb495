"""The MoE SwiGLU layer: y[t] = sum_j weights[t,j] * (silu(x[t] @ w1[e]) * (x[t] @ w3[e])) @ w2[e].

Shapes follow the legend in moe_kernels/__init__.py: T tokens, D model dim, F expert hidden
dim, E experts, K experts per token, N = T*K assignments; an activation with an N dim has its
rows in expert-sorted order. The combine (sorted rows back to tokens) is in combine.py.

Backends (all differentiable in x, w1, w3, w2 and weights):
  triton  CUDA (or CPU under TRITON_INTERPRET=1): routing-plan, gathered grouped GEMMs,
          split dW, deterministic combine kernels; no host synchronisation.
  torch   sort + per-expert GEMMs; the CPU default. On CPU it runs chunk by chunk of sorted
          rows (torch.mm per expert, torch.bmm for runs of experts with equal counts, the
          SwiGLU on the chunk while it is in cache; see _MoeMLPChunkedCPU). On CUDA, whole
          tensors through torch.nn.functional.grouped_mm (per-expert mm where grouped_mm
          cannot run: float64, unaligned strides).
  loop    a per-expert python loop of plain torch ops under autograd; the slow reference.
  auto    triton on CUDA when triton is installed, else torch.

Determinism: the combine never uses atomics. On CUDA (triton, and torch's whole-tensor
path) expert outputs are computed per assignment in sorted order, gathered back through the
inverse permutation and summed over j = 0..K-1 in a fixed order; dx is reduced the same way;
dW partials are summed in a fixed order. The CPU torch path combines the same way (with
embedding_bag, which sums each bag in order on CPU). The weights' gradient is
dweights[t,j] = dot(dy[t], expert_out[t,j]).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as nnf

from ._common import resolve_backend

# The combine lives in combine.py; its names stay importable from here (tests, tools).
from .combine import combine_bwd_torch as combine_bwd_torch
from .combine import combine_bwd_triton as combine_bwd_triton
from .combine import combine_config as combine_config
from .combine import combine_torch as combine_torch
from .combine import combine_triton as combine_triton
from .grouped_gemm import (
    grouped_dw_torch,
    grouped_dw_triton,
    grouped_mm_torch,
    grouped_mm_triton,
)
from .routing import Plan, plan_torch, plan_triton

# --------------------------------------------------------------------------- validation


def _check_moe_args(x_TD, w1_EDF, w3_EDF, w2_EFD, expert_ids_TK, weights_TK):
    def shape(t):
        return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__

    for name, t, nd in [("x_TD", x_TD, 2), ("w1_EDF", w1_EDF, 3), ("w3_EDF", w3_EDF, 3),
                        ("w2_EFD", w2_EFD, 3), ("expert_ids_TK", expert_ids_TK, 2),
                        ("weights_TK", weights_TK, 2)]:
        if not isinstance(t, torch.Tensor) or t.ndim != nd:
            raise ValueError(f"moe_mlp: {name} must be a {nd}-D tensor; got {shape(t)}")
    T, D = x_TD.shape
    E, D1, F = w1_EDF.shape
    if D1 != D:
        raise ValueError(f"moe_mlp: D mismatch: x_TD has D={D} but w1_EDF has D={D1}")
    if tuple(w3_EDF.shape) != (E, D, F):
        raise ValueError(f"moe_mlp: w3_EDF must have shape {(E, D, F)} like w1; got "
                         f"{shape(w3_EDF)}")
    if tuple(w2_EFD.shape) != (E, F, D):
        raise ValueError(f"moe_mlp: w2_EFD must have shape {(E, F, D)}; got {shape(w2_EFD)}")
    if expert_ids_TK.shape[0] != T or tuple(weights_TK.shape) != tuple(expert_ids_TK.shape):
        raise ValueError(
            f"moe_mlp: expert_ids_TK {shape(expert_ids_TK)} and weights_TK {shape(weights_TK)} "
            f"must both be (T={T}, K)"
        )
    if expert_ids_TK.shape[1] < 1:
        raise ValueError("moe_mlp: K must be >= 1")
    if expert_ids_TK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"moe_mlp: expert_ids_TK must be int32/int64; got {expert_ids_TK.dtype}")
    if not weights_TK.is_floating_point():
        raise ValueError(f"moe_mlp: weights_TK must be floating point; got {weights_TK.dtype}")
    for name, t in [("w1_EDF", w1_EDF), ("w3_EDF", w3_EDF), ("w2_EFD", w2_EFD)]:
        if t.dtype != x_TD.dtype:
            raise ValueError(f"moe_mlp: {name} is {t.dtype} but x_TD is {x_TD.dtype}")
    for name, t in [("w1_EDF", w1_EDF), ("w3_EDF", w3_EDF), ("w2_EFD", w2_EFD),
                    ("expert_ids_TK", expert_ids_TK), ("weights_TK", weights_TK)]:
        if t.device != x_TD.device:
            raise ValueError(f"moe_mlp: {name} on {t.device} but x_TD on {x_TD.device}")


# --------------------------------------------------------------------------- autograd


def _swiglu_fwd(h1_NF, h3_NF):
    return nnf.silu(h1_NF) * h3_NF


def _swiglu_bwd(h1_NF, h3_NF, s_NF, da_NF):
    """Gradients of a = silu(h1) * h3 given s = silu(h1): two fused elementwise kernels
    (aten's silu_backward evaluates sigmoid in fp32 internally for bf16/fp16)."""
    dh3_NF = da_NF * s_NF
    dh1_NF = torch.ops.aten.silu_backward(da_NF * h3_NF, h1_NF)
    return dh1_NF, dh3_NF


class _MoeMLP(torch.autograd.Function):
    """Shared forward/backward of the triton and torch backends; use_triton picks the kernels.

    (Fusing w1|w3 into one grouped GEMM was tried for the torch path: no measurable gain on
    CPU, and it keeps a concatenated weight copy alive for the backward, so it is not used.)"""

    @staticmethod
    def forward(ctx, x_TD, w1_EDF, w3_EDF, w2_EFD, weights_TK, plan, use_triton):
        T, K = weights_TK.shape
        off = plan.offsets
        if use_triton:
            # Rows of x are gathered inside the kernel (no permuted copy of x).
            h1_NF = grouped_mm_triton(x_TD, w1_EDF, off, gather_N=plan.token, what="h1 = x @ w1")
            h3_NF = grouped_mm_triton(x_TD, w3_EDF, off, gather_N=plan.token, what="h3 = x @ w3")
            a_NF = _swiglu_fwd(h1_NF, h3_NF)
            o_ND = grouped_mm_triton(a_NF, w2_EFD, off, what="o = a @ w2")
            y_TD = combine_triton(o_ND, plan.inv, weights_TK, T, K, x_TD.dtype, "y = sum w o")
            xs_ND = None
        else:
            xs_ND = x_TD.index_select(0, plan.token)
            h1_NF = grouped_mm_torch(xs_ND, w1_EDF, off)
            h3_NF = grouped_mm_torch(xs_ND, w3_EDF, off)
            a_NF = _swiglu_fwd(h1_NF, h3_NF)
            o_ND = grouped_mm_torch(a_NF, w2_EFD, off)
            y_TD = combine_torch(o_ND, plan.inv, weights_TK, T, K, x_TD.dtype)
        ctx.save_for_backward(x_TD, xs_ND, w1_EDF, w3_EDF, w2_EFD, weights_TK, h1_NF, h3_NF,
                              o_ND, plan.token, plan.order, plan.inv, off)
        ctx.use_triton = use_triton
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        (x_TD, xs_ND, w1_EDF, w3_EDF, w2_EFD, weights_TK, h1_NF, h3_NF, o_ND, token_N,
         order_N, inv_N, off) = ctx.saved_tensors
        T, K = weights_TK.shape
        dy_TD = dy_TD.contiguous().to(o_ND.dtype)
        s_NF = nnf.silu(h1_NF)  # recomputed: cheaper than keeping it
        a_NF = s_NF * h3_NF
        if ctx.use_triton:
            do_ND, dwt_TK = combine_bwd_triton(dy_TD, o_ND, inv_N, weights_TK)
            dw2 = grouped_dw_triton(a_NF, do_ND, off, what="dw2 = a^T do")
            da_NF = grouped_mm_triton(do_ND, w2_EFD.transpose(1, 2), off, what="da = do @ w2^T")
            dh1_NF, dh3_NF = _swiglu_bwd(h1_NF, h3_NF, s_NF, da_NF)
            dw1 = grouped_dw_triton(x_TD, dh1_NF, off, gather_N=token_N, what="dw1 = x^T dh1")
            dw3 = grouped_dw_triton(x_TD, dh3_NF, off, gather_N=token_N, what="dw3 = x^T dh3")
            dxs_ND = grouped_mm_triton(dh1_NF, w1_EDF.transpose(1, 2), off,
                                       what="dx = dh1 @ w1^T")
            dxs_ND += grouped_mm_triton(dh3_NF, w3_EDF.transpose(1, 2), off,
                                        what="dx += dh3 @ w3^T")
            dx_TD = combine_triton(dxs_ND, inv_N, None, T, K, x_TD.dtype, "dx = sum dxs")
        else:
            do_ND, dwt_TK = combine_bwd_torch(dy_TD, o_ND, token_N, order_N, inv_N, weights_TK,
                                              need_dweights=ctx.needs_input_grad[4])
            dw2 = grouped_dw_torch(a_NF, do_ND, off)
            da_NF = grouped_mm_torch(do_ND, w2_EFD.transpose(1, 2), off)
            dh1_NF, dh3_NF = _swiglu_bwd(h1_NF, h3_NF, s_NF, da_NF)
            dw1 = grouped_dw_torch(xs_ND, dh1_NF, off)
            dw3 = grouped_dw_torch(xs_ND, dh3_NF, off)
            dxs_ND = grouped_mm_torch(dh1_NF, w1_EDF.transpose(1, 2), off)
            dxs_ND += grouped_mm_torch(dh3_NF, w3_EDF.transpose(1, 2), off)
            dx_TD = combine_torch(dxs_ND, inv_N, None, T, K, x_TD.dtype)
        dwt = None if dwt_TK is None else dwt_TK.to(weights_TK.dtype)
        return dx_TD, dw1, dw3, dw2, dwt, None, None


# --------------------------------------------------------------------------- CPU torch path

# Rows per chunk of the CPU torch path: as many as make one row-block of max(D, F) elements
# this many bytes. A chunk's temporaries stay in cache between the GEMM that writes them and
# the elementwise ops that read them, and they live in reused per-thread buffers (at most
# seven of this size, see _Workspace) instead of fresh full-size tensors. 4 MiB measured best
# of 1 and 4 MiB on both CPU shapes of tools/bench_kernels.py (docs/benchmarks.md). None: no
# chunking (the whole-tensor path that the torch backend takes on CUDA); tests set it.
CPU_CHUNK_BYTES: int | None = 4 << 20


def _row_chunks(bounds: list[int], max_rows: int):
    """Cut the expert-sorted rows into chunks of at most max_rows rows (at least one row).

    Returns [(lo, hi, runs)]: rows lo:hi, and runs = [(e0, n, s, L)], each n consecutive
    experts e0..e0+n-1 with L rows apiece, starting at row s of the chunk (n > 1 runs are
    done as one bmm). An expert with more than max_rows rows is split across consecutive
    chunks; experts with no rows appear in no run."""
    chunks, segs, start = [], [], bounds[0]
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        while lo < hi:
            take = min(hi - lo, max_rows - (lo - start))
            segs.append((e, lo - start, take))
            lo += take
            if lo - start == max_rows:
                chunks.append((start, lo, _runs(segs)))
                segs, start = [], lo
    if segs:
        chunks.append((start, start + segs[-1][1] + segs[-1][2], _runs(segs)))
    return chunks


def _runs(segs):
    runs = []
    for e, s, L in segs:
        if runs:
            e0, n, s0, L0 = runs[-1]
            if L == L0 and e == e0 + n and s == s0 + n * L0:
                runs[-1] = (e0, n + 1, s0, L0)
                continue
        runs.append((e, 1, s, L))
    return runs


def _chunk_plan(plan: Plan, D: int, F: int, itemsize: int):
    bounds = plan.offsets.tolist()  # CPU: no device to synchronise with
    rows = max(1, CPU_CHUNK_BYTES // (max(D, F) * itemsize))
    return _row_chunks(bounds, rows)


def _per_expert(w_E: torch.Tensor):
    """(w_E, its E per-expert views): one unbind per call instead of one select per GEMM."""
    return w_E, w_E.unbind(0)


def _sizes(runs) -> list[int]:
    return [n * L for _, n, _, L in runs]


def _rows_mm(a: torch.Tensor, w, out: torch.Tensor, runs, accumulate: bool = False) -> None:
    """out[rows of e] = a[rows of e] @ w_E[e] (+= when accumulate), for the runs of a chunk;
    w = _per_expert(w_E). The row blocks come from one split per operand (Python-side view
    making costs about as much as a small GEMM's dispatch)."""
    w_E, w_list = w
    sizes = _sizes(runs)
    for (e0, n, _, L), ap, op in zip(runs, a.split(sizes), out.split(sizes)):
        if n == 1:
            if accumulate:
                op.addmm_(ap, w_list[e0])
            else:
                torch.mm(ap, w_list[e0], out=op)
        else:
            o3 = op.view(n, L, -1)
            if accumulate:
                o3.baddbmm_(ap.view(n, L, -1), w_E[e0:e0 + n])
            else:
                torch.bmm(ap.view(n, L, -1), w_E[e0:e0 + n], out=o3)


def _dw_mm(a: torch.Tensor, g: torch.Tensor, dw, runs, started) -> None:
    """dw_E[e] = a[rows of e]^T @ g[rows of e], added to what is there for an expert whose
    earlier rows were in an earlier chunk (started[e], which the caller keeps);
    dw = _per_expert(dw_E)."""
    dw_E, dw_list = dw
    sizes = _sizes(runs)
    for (e0, n, _, L), ap, gp in zip(runs, a.split(sizes), g.split(sizes)):
        if n > 1 and not any(started[e0:e0 + n]):
            torch.bmm(ap.view(n, L, -1).transpose(1, 2), gp.view(n, L, -1),
                      out=dw_E[e0:e0 + n])
        elif n == 1:
            if started[e0]:
                dw_list[e0].addmm_(ap.t(), gp)
            else:
                torch.mm(ap.t(), gp, out=dw_list[e0])
        else:
            for i, (api, gpi) in enumerate(zip(ap.split(L), gp.split(L))):
                e = e0 + i
                if started[e]:
                    dw_list[e].addmm_(api.t(), gpi)
                else:
                    torch.mm(api.t(), gpi, out=dw_list[e])


class _Workspace(threading.local):
    """Per-thread scratch buffers for the chunk temporaries, reused from call to call, so
    the steady state allocates nothing per chunk: two D-wide ("d0", "d1") and five F-wide
    ("f0".."f4") buffers of at most about CPU_CHUNK_BYTES each (so at most ~28 MiB per
    thread at the default; clear_cpu_workspace() frees them). Nothing handed to the caller
    or saved for backward lives here."""

    def __init__(self):
        self.bufs: dict = {}

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        n = rows * cols
        buf = self.bufs.get((name, dtype))
        if buf is None or buf.numel() < n:
            # A normal tensor even when first needed under torch.inference_mode (Lightning
            # validates under it): an inference tensor could not be written to afterwards,
            # in training. Normal tensors may be written to inside inference mode.
            with torch.inference_mode(False):
                buf = torch.empty(n, dtype=dtype)
            self.bufs[(name, dtype)] = buf
        return buf[:n].view(rows, cols)


_WS = _Workspace()


def clear_cpu_workspace() -> None:
    """Free this thread's scratch buffers of the CPU torch backend."""
    _WS.bufs.clear()


class _MoeMLPChunkedCPU(torch.autograd.Function):
    """The torch backend on CPU: the same maths as _MoeMLP's torch path, done chunk by chunk
    of expert-sorted rows.

    Per chunk: gather its rows of x, one GEMM per expert (one bmm per run of experts with
    equal counts), the SwiGLU while the chunk is in cache, and the w2 GEMM into its rows of
    o; then one combine over all of o (combine_torch: each token's K rows summed in j order,
    as on the whole-tensor path). Only h1 and h3 are kept for the backward (nothing under
    no_grad): x is gathered again per chunk, and o is not needed, as the routing weights'
    gradient is computed from g @ w2^T (see backward). Chunk temporaries live in a
    per-thread workspace: on CPU a fresh full-size temporary costs more than the GEMMs'
    dispatch, since its page faults land inside the kernel that first writes it. Per expert,
    the dW pieces of an expert split across chunks are summed in row order.
    """

    @staticmethod
    def forward(ctx, x_TD, w1_EDF, w3_EDF, w2_EFD, weights_TK, plan):
        T, K = weights_TK.shape
        D, F = x_TD.shape[1], w1_EDF.shape[2]
        dt = x_TD.dtype
        acc = torch.float64 if dt == torch.float64 else torch.float32
        chunks = _chunk_plan(plan, D, F, x_TD.element_size())
        save = any(ctx.needs_input_grad[:5])
        W1, W3, W2 = _per_expert(w1_EDF), _per_expert(w3_EDF), _per_expert(w2_EFD)
        N = plan.token.numel()
        if save:
            h1_NF, h3_NF = x_TD.new_empty(N, F), x_TD.new_empty(N, F)
        o_ND = x_TD.new_empty(N, D)
        for lo, hi, runs in chunks:
            n, tok = hi - lo, plan.token[lo:hi]
            xc = torch.index_select(x_TD, 0, tok, out=_WS.get("d0", n, D, dt))
            if save:
                h1, h3 = h1_NF[lo:hi], h3_NF[lo:hi]
            else:
                h1, h3 = _WS.get("f0", n, F, dt), _WS.get("f1", n, F, dt)
            _rows_mm(xc, W1, h1, runs)
            _rows_mm(xc, W3, h3, runs)
            act = torch.ops.aten.silu.out(h1, out=_WS.get("f2", n, F, dt))
            act.mul_(h3)
            _rows_mm(act, W2, o_ND[lo:hi], runs)
        # One fused gather + weighted sum over each token's K rows (embedding_bag on CPU):
        # measured 5-7% faster over the layer than a weighted scatter-add per chunk.
        y_TD = combine_torch(o_ND, plan.inv, weights_TK, T, K, dt)
        if save:
            # routing weights in sorted order, in the accumulate dtype, for the backward
            w_N = weights_TK.reshape(-1).index_select(0, plan.order).to(acc)
            ctx.save_for_backward(x_TD, w1_EDF, w3_EDF, w2_EFD, weights_TK, h1_NF, h3_NF,
                                  plan.token, w_N, plan.inv)
            ctx.chunks = chunks
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        (x_TD, w1_EDF, w3_EDF, w2_EFD, weights_TK, h1_NF, h3_NF, token_N, w_N,
         inv_N) = ctx.saved_tensors
        T, K = weights_TK.shape
        E, D, F = w1_EDF.shape
        N = token_N.numel()
        dt, acc = x_TD.dtype, w_N.dtype
        # Frozen experts (router-only training) or a leaf x need no dW / dx: skip those GEMMs.
        need_dx, need_dw1, need_dw3, need_dw2, need_dwt = ctx.needs_input_grad[:5]
        dy_TD = dy_TD.contiguous().to(dt)
        dwt_N = torch.empty(N, dtype=acc) if need_dwt else None
        dw1 = w1_EDF.new_empty(E, D, F) if need_dw1 else None
        dw3 = w3_EDF.new_empty(E, D, F) if need_dw3 else None
        dw2 = w2_EFD.new_empty(E, F, D) if need_dw2 else None
        started = [False] * E
        dxs_ND = x_TD.new_empty(N, D) if need_dx else None
        W1T, W3T = _per_expert(w1_EDF.transpose(1, 2)), _per_expert(w3_EDF.transpose(1, 2))
        W2T = _per_expert(w2_EFD.transpose(1, 2))
        DW1, DW3, DW2 = (None if d is None else _per_expert(d) for d in (dw1, dw3, dw2))
        for lo, hi, runs in ctx.chunks:
            n, tok = hi - lo, token_N[lo:hi]
            w_col = w_N[lo:hi, None]
            # Row r of the chunk is assignment (t, j) with o[r] = act[r] @ w2[e] and
            # y[t] += w[r] * o[r]. With g[r] = dy[t] and gw = g @ w2[e]^T:
            #   dweights[r] = g[r] . o[r] = gw[r] . act[r]   (so o need not be kept)
            #   da[r] = w[r] * gw[r]        dw2[e] = sum_r (w[r] * act[r])^T g[r]
            g = torch.index_select(dy_TD, 0, tok, out=_WS.get("d1", n, D, dt))
            gw = _WS.get("f1", n, F, dt)
            _rows_mm(g, W2T, gw, runs)
            h1, h3 = h1_NF[lo:hi], h3_NF[lo:hi]
            s = torch.ops.aten.silu.out(h1, out=_WS.get("f0", n, F, dt))
            act = torch.mul(s, h3, out=_WS.get("f2", n, F, dt))
            if dt == acc:
                if need_dwt:
                    prod = torch.mul(gw, act, out=_WS.get("f3", n, F, dt))
                    torch.sum(prod, 1, out=dwt_N[lo:hi])
                act.mul_(w_col)
                da = gw.mul_(w_col)
            else:  # bf16/fp16: products in fp32, rounded once
                gw32, act32 = gw.to(acc), act.to(acc)
                if need_dwt:
                    torch.sum(gw32 * act32, 1, out=dwt_N[lo:hi])
                act.copy_(act32.mul_(w_col))
                da = gw.copy_(gw32.mul_(w_col))
            if need_dw2:
                _dw_mm(act, g, DW2, runs, started)
            # a = silu(h1) * h3: dh3 = da * s; dh1 = silu'(h1) * (da * h3)
            dh3 = torch.mul(da, s, out=_WS.get("f3", n, F, dt))
            dah3 = torch.mul(da, h3, out=act)  # act is dead after dW2
            dh1 = torch.ops.aten.silu_backward.grad_input(dah3, h1,
                                                          grad_input=_WS.get("f4", n, F, dt))
            if need_dw1 or need_dw3:
                xc = torch.index_select(x_TD, 0, tok, out=_WS.get("d0", n, D, dt))
                if need_dw1:
                    _dw_mm(xc, dh1, DW1, runs, started)
                if need_dw3:
                    _dw_mm(xc, dh3, DW3, runs, started)
            if need_dx:
                _rows_mm(dh1, W1T, dxs_ND[lo:hi], runs)
                _rows_mm(dh3, W3T, dxs_ND[lo:hi], runs, accumulate=True)
            for e0, n_run, _, _ in runs:
                started[e0:e0 + n_run] = [True] * n_run
        for e in range(E):
            if not started[e]:  # experts with no rows: gradient exactly zero
                for dw in (dw1, dw3, dw2):
                    if dw is not None:
                        dw[e].zero_()
        dwt = None if dwt_N is None else dwt_N.index_select(0, inv_N).view(T, K).to(
            weights_TK.dtype)
        dx_TD = None if dxs_ND is None else combine_torch(dxs_ND, inv_N, None, T, K, dt)
        return dx_TD, dw1, dw3, dw2, dwt, None


def _moe_mlp_loop(x_TD, w1_EDF, w3_EDF, w2_EFD, expert_ids_TK, weights_TK):
    """Per-expert loop under plain autograd: the slow reference backend."""
    T, K = expert_ids_TK.shape
    flat_N = expert_ids_TK.reshape(-1)
    idx_list, out_list = [], []
    for e in range(w1_EDF.shape[0]):
        idx = torch.nonzero(flat_N == e).squeeze(1)
        if idx.numel() == 0:
            continue
        xe = x_TD.index_select(0, idx // K)
        out_list.append((nnf.silu(xe @ w1_EDF[e]) * (xe @ w3_EDF[e])) @ w2_EFD[e])
        idx_list.append(idx)
    idx_N = torch.cat(idx_list)
    inv_N = torch.empty_like(idx_N)
    inv_N[idx_N] = torch.arange(idx_N.numel(), device=idx_N.device)
    o_TKD = torch.cat(out_list).index_select(0, inv_N).view(T, K, -1)
    acc = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
    y_TD = (weights_TK.to(acc).unsqueeze(2) * o_TKD.to(acc)).sum(1)
    return y_TD.to(x_TD.dtype)


# --------------------------------------------------------------------------- public


def moe_mlp(
    x_TD: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    backend: str = "auto",
    routing_plan: Plan | None = None,
) -> torch.Tensor:
    """y[t] = sum_j weights[t,j] * (silu(x[t] @ w1[e]) * (x[t] @ w3[e])) @ w2[e], e = ids[t,j].

    Differentiable in x, w1, w3, w2 and weights (not in expert_ids). x and the three weights
    must share a dtype; weights_TK may be float32 with bf16 activations. routing_plan: a Plan
    from moe_kernels.plan(expert_ids_TK, E) to reuse (else built here).
    """
    _check_moe_args(x_TD, w1_EDF, w3_EDF, w2_EFD, expert_ids_TK, weights_TK)
    b = resolve_backend(backend, x_TD, "moe_mlp")
    E = w1_EDF.shape[0]
    if b == "loop":
        from .routing import _check_ids

        _check_ids(expert_ids_TK, E, "moe_mlp")
        return _moe_mlp_loop(x_TD, w1_EDF, w3_EDF, w2_EFD, expert_ids_TK, weights_TK)
    if routing_plan is None:
        routing_plan = (plan_triton if b == "triton" else plan_torch)(expert_ids_TK, E)
    elif routing_plan.num_experts != E or routing_plan.order.numel() != expert_ids_TK.numel():
        raise ValueError("moe_mlp: routing_plan does not match expert_ids_TK / num experts")
    if b == "torch" and x_TD.device.type == "cpu" and CPU_CHUNK_BYTES is not None:
        return _MoeMLPChunkedCPU.apply(x_TD, w1_EDF, w3_EDF, w2_EFD, weights_TK, routing_plan)
    return _MoeMLP.apply(x_TD, w1_EDF, w3_EDF, w2_EFD, weights_TK, routing_plan, b == "triton")
