"""The combine: expert outputs, in expert-sorted order, back to their tokens.

y[t] = sum_j weights[t,j] * o[inv[t*K+j]]: a gather through the routing plan's inverse
permutation and a weighted sum over each token's K rows, summed over j = 0..K-1 in a fixed
order (no atomics: deterministic), with its backward (do in sorted order, dweights). A triton
kernel pair and torch twins of both; the MoE layer (moe_mlp.py) calls them. Shapes follow the
legend in moe_kernels/__init__.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf

from ._common import HAS_TRITON, next_pow2, tl, triton
from ._launch import Config, Launch, run

# --------------------------------------------------------------------------- triton kernels

if HAS_TRITON:

    @triton.jit
    def _combine_kernel(
        o_ptr, inv_ptr, w_ptr, y_ptr,
        D, stride_on, stride_yt,
        K: tl.constexpr, HAS_W: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # y[t] = sum_{j<K} w[t,j] * o[inv[t*K+j]], j in a fixed order, fp32 accumulate.
        t = tl.program_id(0).to(tl.int64)
        dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = dd < D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for j in tl.static_range(K):
            r = tl.load(inv_ptr + t * K + j).to(tl.int64)
            v = tl.load(o_ptr + r * stride_on + dd, mask=dmask, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(w_ptr + t * K + j).to(tl.float32)
            acc += v
        tl.store(y_ptr + t * stride_yt + dd, acc.to(y_ptr.dtype.element_ty), mask=dmask)

    @triton.jit
    def _combine_bwd_kernel(
        dy_ptr, o_ptr, inv_ptr, w_ptr, do_ptr, dwt_ptr,
        D, stride_dyt, stride_on, stride_don,
        K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # For token t and each j: dweights[t,j] = dot(dy[t], o[r]) and do[r] = w[t,j]*dy[t],
        # r = inv[t*K+j]. Each sorted row r belongs to exactly one (t, j): plain stores.
        t = tl.program_id(0).to(tl.int64)
        for j in tl.static_range(K):
            r = tl.load(inv_ptr + t * K + j).to(tl.int64)
            wt = tl.load(w_ptr + t * K + j).to(tl.float32)
            acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                dmask = dd < D
                g = tl.load(dy_ptr + t * stride_dyt + dd, mask=dmask, other=0.0).to(tl.float32)
                v = tl.load(o_ptr + r * stride_on + dd, mask=dmask, other=0.0).to(tl.float32)
                acc += g * v
                tl.store(do_ptr + r * stride_don + dd, (wt * g).to(do_ptr.dtype.element_ty),
                         mask=dmask)
            tl.store(dwt_ptr + t * K + j, tl.sum(acc, 0))


def combine_config(D: int) -> Config:
    """One program per token and BLOCK_D columns of it (at most 1024: 8 per thread)."""
    return Config.of(num_warps=4, num_stages=3, BLOCK_D=min(1024, max(16, next_pow2(D))))


def combine_triton(o_ND: torch.Tensor, inv_N: torch.Tensor, weights_TK: torch.Tensor | None,
                   T: int, K: int, out_dtype: torch.dtype, what: str = "") -> torch.Tensor:
    """y[t] = sum_j weights[t,j] * o[inv[t*K+j]] (weights None: plain sum). Deterministic."""
    D = o_ND.shape[1]
    y_TD = torch.empty(T, D, dtype=out_dtype, device=o_ND.device)
    if T == 0 or D == 0:
        return y_TD
    cfg = combine_config(D)
    w = weights_TK.contiguous() if weights_TK is not None else inv_N  # dummy when unused
    run(Launch(
        _combine_kernel, (T, triton.cdiv(D, cfg["BLOCK_D"])),
        dict(o_ptr=o_ND, inv_ptr=inv_N, w_ptr=w, y_ptr=y_TD,
             D=D, stride_on=o_ND.stride(0), stride_yt=y_TD.stride(0)),
        dict(K=K, HAS_W=weights_TK is not None, **cfg.meta()),
        cfg.num_warps, cfg.num_stages, what))
    return y_TD


def combine_bwd_triton(dy_TD: torch.Tensor, o_ND: torch.Tensor, inv_N: torch.Tensor,
                       weights_TK: torch.Tensor):
    """Returns (do_ND in sorted order, dweights_TK fp32)."""
    T, K = weights_TK.shape
    N, D = o_ND.shape
    do_ND = torch.empty(N, D, dtype=o_ND.dtype, device=o_ND.device)
    dwt_TK = torch.empty(T, K, dtype=torch.float32, device=o_ND.device)
    if T == 0:
        return do_ND, dwt_TK
    cfg = combine_config(D)
    run(Launch(
        _combine_bwd_kernel, (T,),
        dict(dy_ptr=dy_TD, o_ptr=o_ND, inv_ptr=inv_N, w_ptr=weights_TK.contiguous(),
             do_ptr=do_ND, dwt_ptr=dwt_TK,
             D=D, stride_dyt=dy_TD.stride(0), stride_on=o_ND.stride(0),
             stride_don=do_ND.stride(0)),
        dict(K=K, **cfg.meta()),
        cfg.num_warps, cfg.num_stages, "do, dweights"))
    return do_ND, dwt_TK


def _use_embedding_bag(o_ND: torch.Tensor) -> bool:
    # embedding_bag(mode="sum") is a fused gather + weighted sum over each bag, run bag by bag
    # in index order on CPU (deterministic); about 3x faster there than index_select + bmm.
    # Its per-sample weights must share o's dtype, so only fp32/fp64 (no bf16 rounding of
    # the routing weights), and only on CPU (the CUDA kernel's reduction order is not ours).
    return o_ND.device.type == "cpu" and o_ND.dtype in (torch.float32, torch.float64)


def combine_torch(o_ND: torch.Tensor, inv_N: torch.Tensor, weights_TK: torch.Tensor | None,
                  T: int, K: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Torch twin of combine_triton: gather by inverse permutation, reduce over K in order."""
    if _use_embedding_bag(o_ND):
        psw = None if weights_TK is None else weights_TK.to(o_ND.dtype).contiguous()
        y_TD = nnf.embedding_bag(inv_N.view(T, K), o_ND, per_sample_weights=psw, mode="sum")
        return y_TD.to(out_dtype)
    g_TKD = o_ND.index_select(0, inv_N).view(T, K, -1)
    if weights_TK is None:
        return g_TKD.sum(1).to(out_dtype)
    acc = torch.float64 if o_ND.dtype == torch.float64 else torch.float32
    # (T,1,K) @ (T,K,D): the weighted sum over K as one batched matmul, fp32 accumulate.
    y_T1D = torch.bmm(weights_TK.to(acc).unsqueeze(1), g_TKD.to(acc))
    return y_T1D.squeeze(1).to(out_dtype)


def combine_bwd_torch(dy_TD: torch.Tensor, o_ND: torch.Tensor, token_N: torch.Tensor,
                      order_N: torch.Tensor, inv_N: torch.Tensor, weights_TK: torch.Tensor,
                      need_dweights: bool = True):
    """Torch twin of combine_bwd_triton: (do_ND sorted, dweights_TK in o's accumulate dtype).

    Works in sorted order: g[r] = dy[token[r]], do[r] = w[r] * g[r], dweights[r] = o[r].g[r],
    then dweights is put back in (t, j) order through inv."""
    T, K = weights_TK.shape
    acc = torch.float64 if o_ND.dtype == torch.float64 else torch.float32
    g_ND = dy_TD.index_select(0, token_N)
    w_N = weights_TK.reshape(-1).index_select(0, order_N).to(acc)
    if not need_dweights:
        # e.g. hard domain routing: constant weights, no router to train
        do_ND = (g_ND.to(acc) * w_N.unsqueeze(1)).to(o_ND.dtype)
        return do_ND, None
    if o_ND.dtype == acc:
        dwt_N = torch.einsum("nd,nd->n", o_ND, g_ND)
        do_ND = g_ND * w_N.unsqueeze(1)
    else:
        dwt_N = torch.einsum("nd,nd->n", o_ND.to(acc), g_ND.to(acc))
        do_ND = (g_ND.to(acc) * w_N.unsqueeze(1)).to(o_ND.dtype)
    return do_ND, dwt_N.index_select(0, inv_N).view(T, K)
