"""Pure-torch references for every kernel in moe_kernels.

These are the slow, obviously-correct definitions the fast paths are tested against. They
run in whatever dtype they are given (tests pass float64) and make no attempt at speed.

Shapes follow the legend in moe_kernels/__init__.py: T tokens, D model dim, F expert hidden
dim, E experts, K experts per token, N rows of a grouped operand (N = T*K for the MoE layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf


def topk_route_ref(
    logits_TE: torch.Tensor, k: int, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, top-k, ties broken by lower expert id (stable descending sort)."""
    probs_TE = torch.softmax(logits_TE.float() if logits_TE.dtype != torch.float64
                             else logits_TE, dim=-1)
    vals_TE, idx_TE = torch.sort(probs_TE, dim=-1, descending=True, stable=True)
    weights_TK, ids_TK = vals_TE[:, :k], idx_TE[:, :k]
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, ids_TK


def plan_ref(expert_ids_TK: torch.Tensor, num_experts: int):
    """Stable sort of the flattened assignments by expert: order, counts, offsets (int32)."""
    flat_N = expert_ids_TK.reshape(-1).long()
    order_N = torch.sort(flat_N, stable=True).indices
    counts_E = torch.bincount(flat_N, minlength=num_experts)
    offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat_N.device)
    offsets_E1[1:] = torch.cumsum(counts_E, 0)
    return order_N, counts_E, offsets_E1.to(torch.int32)


def grouped_mm_ref(x_ND: torch.Tensor, w_EDF: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows offsets[e]:offsets[e+1] of x times w[e]; a plain loop over experts."""
    bounds = offsets.tolist()
    y_NF = x_ND.new_zeros(x_ND.shape[0], w_EDF.shape[2])
    for e in range(w_EDF.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            y_NF[lo:hi] = x_ND[lo:hi] @ w_EDF[e]
    return y_NF


def grouped_dw_ref(x_ND: torch.Tensor, dy_NF: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """dW[e] = x[rows of e]^T @ dy[rows of e]; experts without rows get exact zeros."""
    bounds = offsets.tolist()
    E = len(bounds) - 1
    dw_EDF = x_ND.new_zeros(E, x_ND.shape[1], dy_NF.shape[1])
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            dw_EDF[e] = x_ND[lo:hi].T @ dy_NF[lo:hi]
    return dw_EDF


def swiglu_ffn_ref(x_D: torch.Tensor, w1_DF, w3_DF, w2_FD) -> torch.Tensor:
    """One expert: (silu(x @ w1) * (x @ w3)) @ w2."""
    return (nnf.silu(x_D @ w1_DF) * (x_D @ w3_DF)) @ w2_FD


def moe_mlp_ref(
    x_TD: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
) -> torch.Tensor:
    """Per-token definition: y[t] = sum_j weights[t,j] * swiglu_e(x[t]), e = expert_ids[t,j].

    Built from differentiable torch ops, so autograd gives the reference gradients too.
    Slow (a python loop over T*K); only for small test shapes.
    """
    T, K = expert_ids_TK.shape
    ids = expert_ids_TK.tolist()
    rows = []
    for t in range(T):
        acc_D = None
        for j in range(K):
            e = ids[t][j]
            term_D = weights_TK[t, j] * swiglu_ffn_ref(x_TD[t], w1_EDF[e], w3_EDF[e], w2_EFD[e])
            acc_D = term_D if acc_D is None else acc_D + term_D
        rows.append(acc_D)
    return torch.stack(rows)


def combine_ref(out_ND: torch.Tensor, inv_N: torch.Tensor, weights_TK: torch.Tensor):
    """y[t] = sum_j weights[t,j] * out[inv[t*K+j]], summed over j in increasing order."""
    T, K = weights_TK.shape
    g_TKD = out_ND[inv_N.long()].view(T, K, -1)
    y_TD = torch.zeros_like(g_TKD[:, 0])
    for j in range(K):
        y_TD = y_TD + weights_TK[:, j, None] * g_TKD[:, j]
    return y_TD
