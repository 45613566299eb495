"""Routing: fused softmax + top-k, and the token permutation plan (counts, offsets, order).

Shapes follow the legend in moe_kernels/__init__.py: T tokens, E experts, K experts per
token, N = T*K assignments, C chunks of assignments (one triton program each), E1 = E + 1.

Layers: @triton.jit kernel -> launcher (checks, allocates, launches) -> public function,
with the torch reference path beside each (also the CPU implementation).

The triton path never synchronises with the host: counts come from a per-chunk histogram
kernel (no bincount, whose output size is data dependent), offsets from an on-device cumsum,
and the permutation from a second kernel that ranks assignments within their chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import HAS_TRITON, next_pow2, require_triton, tl, triton, triton_usable
from ._launch import Config, Launch, run


@dataclass
class Plan:
    """The token permutation for a (T, K) assignment of experts.

    order_N:   sorted position -> flat assignment index t*K+j (stable sort by expert), int64.
    inv_N:     flat assignment index -> sorted position (inverse of order), int64.
    token_N:   sorted position -> token id (order // K), int64; rows of x to gather.
    counts_E:  assignments per expert, int32.
    offsets:   (E+1,) int32 start offsets; rows offsets[e]:offsets[e+1] belong to expert e.
    """

    order: torch.Tensor
    inv: torch.Tensor
    token: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    num_experts: int
    k: int


# --------------------------------------------------------------------------- validation


def _check_logits(logits_TE: torch.Tensor, k: int) -> None:
    if not isinstance(logits_TE, torch.Tensor) or logits_TE.ndim != 2:
        raise ValueError(
            f"topk_route: logits_TE must be a 2-D (T, E) tensor; got shape "
            f"{tuple(getattr(logits_TE, 'shape', ()))}"
        )
    if not logits_TE.is_floating_point():
        raise ValueError(f"topk_route: logits_TE must be floating point; got {logits_TE.dtype}")
    E = logits_TE.shape[1]
    if not isinstance(k, int) or not 1 <= k <= E:
        raise ValueError(f"topk_route: k must be an int in 1..E={E}; got {k!r}")


def _check_ids(expert_ids_TK: torch.Tensor, num_experts: int, what: str) -> None:
    if not isinstance(expert_ids_TK, torch.Tensor) or expert_ids_TK.ndim != 2:
        raise ValueError(
            f"{what}: expert_ids_TK must be a 2-D (T, K) tensor; got shape "
            f"{tuple(getattr(expert_ids_TK, 'shape', ()))}"
        )
    if expert_ids_TK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{what}: expert_ids_TK must be int32 or int64; got {expert_ids_TK.dtype}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"{what}: num_experts must be a positive int; got {num_experts!r}")
    # A range check needs the values on the host: do it on CPU only; on CUDA it would be a
    # synchronisation, which the triton path promises not to do (out-of-range ids on CUDA
    # are the caller's bug; they are dropped from counts and give garbage rows).
    if expert_ids_TK.device.type == "cpu" and expert_ids_TK.numel() > 0:
        lo, hi = int(expert_ids_TK.min()), int(expert_ids_TK.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(
                f"{what}: expert id out of range: ids span [{lo}, {hi}] but num_experts="
                f"{num_experts}"
            )


# --------------------------------------------------------------------------- triton kernels

if HAS_TRITON:

    @triton.jit
    def _topk_route_kernel(
        logits_ptr, weights_ptr, ids_ptr,
        T, E, stride_lt, stride_le,
        K: tl.constexpr, NORMALIZE: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        rmask = rows < T
        cmask = cols < E
        x = tl.load(
            logits_ptr + rows[:, None].to(tl.int64) * stride_lt + cols[None, :] * stride_le,
            mask=rmask[:, None] & cmask[None, :], other=0.0,
        ).to(tl.float32)
        x = tl.where(cmask[None, :], x, float("-inf"))
        # Softmax in fp32, max-subtracted for range safety.
        m = tl.max(x, 1)
        p = tl.exp(x - m[:, None])
        p = tl.where(cmask[None, :], p, 0.0)
        p = p / tl.sum(p, 1)[:, None]
        # Padding columns get -1: below every probability, never selected.
        p = tl.where(cmask[None, :], p, -1.0)
        kcols = tl.arange(0, BLOCK_K)
        w_tile = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        id_tile = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
        for j in tl.static_range(K):
            best = tl.max(p, 1)
            # Ties: the lowest column holding the maximum wins.
            cand = tl.where(p == best[:, None], cols[None, :], BLOCK_E)
            arg = tl.min(cand, 1)
            w_tile = tl.where(kcols[None, :] == j, best[:, None], w_tile)
            id_tile = tl.where(kcols[None, :] == j, arg[:, None], id_tile)
            # Knock the winner out (-2 is below the padding's -1).
            p = tl.where(cols[None, :] == arg[:, None], -2.0, p)
        if NORMALIZE:
            w_tile = w_tile / tl.sum(w_tile, 1)[:, None]
        out_off = rows[:, None].to(tl.int64) * K + kcols[None, :]
        omask = rmask[:, None] & (kcols[None, :] < K)
        tl.store(weights_ptr + out_off, w_tile, mask=omask)
        tl.store(ids_ptr + out_off, id_tile.to(tl.int64), mask=omask)

    @triton.jit
    def _histogram_kernel(
        ids_ptr, hist_ptr, N, E,
        BLOCK: tl.constexpr, E_PAD: tl.constexpr,
    ):
        # One program per chunk of BLOCK assignments: hist[c, e] = #{i in chunk c: ids[i]==e}.
        # A one-hot reduction instead of atomics keeps it deterministic and race-free.
        c = tl.program_id(0)
        offs = c * BLOCK + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < N, other=-1).to(tl.int32)
        experts = tl.arange(0, E_PAD)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
        h = tl.sum(onehot, 0)
        tl.store(hist_ptr + c * E + experts, h, mask=experts < E)

    @triton.jit
    def _scatter_kernel(
        ids_ptr, base_ptr, order_ptr, inv_ptr, N, E,
        BLOCK: tl.constexpr, E_PAD: tl.constexpr,
    ):
        # Sorted position of assignment i = base[c, e_i] + (rank of i among the chunk's
        # assignments to e_i). base already holds offsets[e] + earlier chunks' counts, so
        # the result is the stable sort by expert.
        c = tl.program_id(0)
        offs = c * BLOCK + tl.arange(0, BLOCK)
        valid = offs < N
        ids = tl.load(ids_ptr + offs, mask=valid, other=-1).to(tl.int32)
        experts = tl.arange(0, E_PAD)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
        running = tl.cumsum(onehot, 0)
        rank = tl.sum(tl.where(onehot != 0, running - 1, 0), 1)
        base = tl.load(base_ptr + c * E + ids, mask=valid, other=0)
        pos = (base + rank).to(tl.int64)
        tl.store(inv_ptr + offs, pos, mask=valid)
        tl.store(order_ptr + pos, offs.to(tl.int64), mask=valid)


# --------------------------------------------------------------------------- configs


def topk_route_config(T: int, E: int, k: int) -> Config:
    """A (BLOCK_T, BLOCK_E) tile of logits per program, about 4k elements (32 per thread)."""
    block_e = max(16, next_pow2(E))
    block_t = max(1, min(64, 4096 // block_e))
    return Config.of(num_warps=4, num_stages=1, BLOCK_T=block_t, BLOCK_E=block_e,
                     BLOCK_K=max(2, next_pow2(k)))


def plan_config(E: int) -> Config:
    """Chunk of assignments per program of the histogram and scatter kernels: the one-hot
    (BLOCK, E_PAD) tile stays around 4k elements, 32 per thread. (16k, as before, made the
    scatter kernel's cumsum spill on sm_80/90/100 at E=8, 255 registers; see
    docs/benchmarks.md, GPU compile check; and gave only N/1024 programs at E <= 16.)"""
    e_pad = max(16, next_pow2(E))
    block = max(16, min(1024, next_pow2(4096 // e_pad)))
    return Config.of(num_warps=4, num_stages=1, BLOCK=block, E_PAD=e_pad)


# --------------------------------------------------------------------------- launchers


def topk_route_triton(logits_TE: torch.Tensor, k: int, normalize: bool = True):
    _check_logits(logits_TE, k)
    require_triton(logits_TE, "topk_route")
    T, E = logits_TE.shape
    weights_TK = torch.empty(T, k, dtype=torch.float32, device=logits_TE.device)
    ids_TK = torch.empty(T, k, dtype=torch.int64, device=logits_TE.device)
    if T == 0:
        return weights_TK, ids_TK
    cfg = topk_route_config(T, E, k)
    run(Launch(
        _topk_route_kernel, (triton.cdiv(T, cfg["BLOCK_T"]),),
        dict(logits_ptr=logits_TE, weights_ptr=weights_TK, ids_ptr=ids_TK, T=T, E=E,
             stride_lt=logits_TE.stride(0), stride_le=logits_TE.stride(1)),
        dict(K=k, NORMALIZE=bool(normalize), **cfg.meta()),
        cfg.num_warps, cfg.num_stages, "top-k of the router logits"))
    return weights_TK, ids_TK


def plan_triton(expert_ids_TK: torch.Tensor, num_experts: int) -> Plan:
    _check_ids(expert_ids_TK, num_experts, "plan")
    require_triton(expert_ids_TK, "plan")
    T, K = expert_ids_TK.shape
    E = num_experts
    dev = expert_ids_TK.device
    ids_N = expert_ids_TK.reshape(-1).contiguous()
    N = ids_N.numel()
    cfg = plan_config(E)
    C = max(1, triton.cdiv(N, cfg["BLOCK"]))
    hist_CE = torch.empty(C, E, dtype=torch.int32, device=dev)
    order_N = torch.empty(N, dtype=torch.int64, device=dev)
    inv_N = torch.empty(N, dtype=torch.int64, device=dev)
    if N == 0:
        hist_CE.zero_()
    else:
        run(Launch(_histogram_kernel, (C,), dict(ids_ptr=ids_N, hist_ptr=hist_CE, N=N, E=E),
                   cfg.meta(), cfg.num_warps, cfg.num_stages, "per-chunk expert counts"))
    # On-device scans (no host sync): offsets, and each chunk's base position per expert.
    counts_E = hist_CE.sum(0, dtype=torch.int32)
    offsets_E1 = torch.zeros(E + 1, dtype=torch.int32, device=dev)
    offsets_E1[1:] = torch.cumsum(counts_E, 0, dtype=torch.int32)
    base_CE = (torch.cumsum(hist_CE, 0, dtype=torch.int32) - hist_CE) + offsets_E1[None, :E]
    base_CE = base_CE.contiguous()
    if N > 0:
        run(Launch(_scatter_kernel, (C,),
                   dict(ids_ptr=ids_N, base_ptr=base_CE, order_ptr=order_N, inv_ptr=inv_N,
                        N=N, E=E),
                   cfg.meta(), cfg.num_warps, cfg.num_stages, "sorted positions"))
    return Plan(order_N, inv_N, order_N // K, counts_E, offsets_E1, E, K)


# --------------------------------------------------------------------------- torch paths


def topk_route_torch(logits_TE: torch.Tensor, k: int, normalize: bool = True):
    _check_logits(logits_TE, k)
    acc = torch.float64 if logits_TE.dtype == torch.float64 else torch.float32
    probs_TE = torch.softmax(logits_TE.to(acc), dim=-1)
    if k == 1:
        # max returns the first maximal index: the lower-id tie rule, cheaper than a sort.
        vals_T1, ids_T1 = probs_TE.max(dim=-1, keepdim=True)
        weights_TK, ids_TK = vals_T1, ids_T1
    else:
        # A stable descending sort gives the documented tie rule (lower id first); topk
        # does not promise one.
        vals_TE, idx_TE = torch.sort(probs_TE, dim=-1, descending=True, stable=True)
        weights_TK, ids_TK = vals_TE[:, :k].contiguous(), idx_TE[:, :k].contiguous()
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, ids_TK


def plan_torch(expert_ids_TK: torch.Tensor, num_experts: int) -> Plan:
    _check_ids(expert_ids_TK, num_experts, "plan")
    T, K = expert_ids_TK.shape
    E = num_experts
    flat_N = expert_ids_TK.reshape(-1).long()
    order_N = torch.sort(flat_N, stable=True).indices
    inv_N = torch.empty_like(order_N)
    inv_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
    counts_E = torch.bincount(flat_N, minlength=E).to(torch.int32)
    offsets_E1 = torch.zeros(E + 1, dtype=torch.int32, device=flat_N.device)
    offsets_E1[1:] = torch.cumsum(counts_E, 0, dtype=torch.int32)
    return Plan(order_N, inv_N, order_N // K, counts_E, offsets_E1, E, K)


# --------------------------------------------------------------------------- public


def topk_route(logits_TE: torch.Tensor, k: int, normalize: bool = True, backend: str = "auto"):
    """Softmax over experts, top-k, renormalised to sum 1 when normalize.

    Returns (weights_TK float32 (float64 for float64 logits), expert_ids_TK int64). Ties go
    to the lower expert id. Not differentiable (routing gradients are the caller's choice:
    pass the returned weights through a differentiable gather of your own softmax if needed).
    """
    _check_logits(logits_TE, k)
    use_triton = backend == "triton" or (
        backend == "auto" and triton_usable(logits_TE) and logits_TE.dtype != torch.float64
    )
    if use_triton:
        return topk_route_triton(logits_TE, k, normalize)
    return topk_route_torch(logits_TE, k, normalize)


def plan(expert_ids_TK: torch.Tensor, num_experts: int, backend: str = "auto") -> Plan:
    """The token permutation: stable sort of flattened assignments by expert."""
    use_triton = backend == "triton" or (backend == "auto" and expert_ids_TK.is_cuda
                                         and HAS_TRITON)
    if use_triton:
        return plan_triton(expert_ids_TK, num_experts)
    return plan_torch(expert_ids_TK, num_experts)
