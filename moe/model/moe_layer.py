"""Mixture-of-experts FFN: a router picks experts per token, `moe_kernels.moe_mlp` runs them.

Shape legend: the one stated in moe_kernels/__init__.py, shared by the kernels and moe.model.
Here: B batch, L sequence length, T = B*L tokens, D model dim, E experts, K experts per token,
F expert hidden dim, Fs shared-expert hidden dim.

Parameters (names are part of the checkpoint format):
    w1  (E, D, F)  gate projections, kernel layout (x @ w1[e])
    w3  (E, D, F)  up projections
    w2  (E, F, D)  down projections
    router.weight (E, D)           learned router only
    shared.{w1,w3,w2}.weight       optional always-on shared expert (a dense SwiGLU)
    shared_gate.weight (1, D)      with moe.shared_expert_gate: the shared expert's output is
                                   scaled by sigmoid(shared_gate x) (Qwen2-MoE's shared gate)

Buffers (the learned router with `bias_update_rate` > 0 only):
    score_bias (E,)                aux-free balancing bias: saved in the checkpoint, not a parameter

Routers:
    learned  scores s_TE = softmax(logits) over the E experts, or sigmoid(logits) of each expert
             on its own (`scoring`, DeepSeek-V3); the top-k experts of s + b (b the balancing bias,
             zero unless `bias_update_rate` > 0) are chosen, and their weights are s alone,
             renormalised to sum 1 when `normalize_weights` (Switch / Mixtral / DeepSeek-V3).
             Auxiliary losses: the Switch load-balancing loss, DeepSeek-V3's sequence-wise
             balance loss, the ST-MoE router z-loss (see `aux_loss`).
    domain   hard routing: every token of a sequence goes to its domain's expert (weight 1). The
             caller passes `domain` as expert indices (see `Transformer.forward`).

Auxiliary-loss-free balancing (DeepSeek-V3, Wang et al. 2024): in training, each layer counts the
assignments load_E of every forward; after every optimizer step `update_router_biases` sets
b_e += bias_update_rate * sign(mean_e(load) - load_e) and clears the counts (moe.train.module and
moe.train.loop call it). The bias steers the choice, never the weights or a gradient.
"""

from __future__ import annotations

import moe_kernels
import torch
import torch.nn as nn
import torch.nn.functional as nnf

from moe.config import ModelConfig


def domain_to_expert(domain_names: list[str], experts: list[str]) -> torch.Tensor:
    """Map global domain ids to expert indices (-1 where a domain has no expert): what the
    `domain` router takes, from a batch's domain ids."""
    return torch.tensor([experts.index(d) if d in experts else -1 for d in domain_names])


class MoEFFN(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        m = cfg.moe
        self.layer_idx = layer_idx
        self.expert_names = list(m.experts)
        self.num_experts = E = len(m.experts)
        self.top_k = 1 if m.router == "domain" else m.top_k
        self.router_kind = m.router
        self.normalize = m.normalize_weights
        self.lb_coef, self.z_coef, self.jitter = m.load_balance_coef, m.z_loss_coef, m.jitter
        self.backend = m.backend
        self.scoring = m.scoring
        self.bias_rate = m.bias_update_rate if m.router == "learned" else 0.0
        self.seq_coef = m.seq_aux_coef
        D, F = cfg.dim, m.expert_ffn_dim or cfg.ffn_dim
        self.w1 = nn.Parameter(torch.empty(E, D, F))
        self.w3 = nn.Parameter(torch.empty(E, D, F))
        self.w2 = nn.Parameter(torch.empty(E, F, D))
        self.router = nn.Linear(D, E, bias=False) if m.router == "learned" else None
        self.score_bias: torch.Tensor | None
        if self.bias_rate > 0:
            self.register_buffer("score_bias", torch.zeros(E))
            # assignments per expert since the last bias update (training forwards only)
            self.register_buffer("load_count", torch.zeros(E), persistent=False)
        else:
            self.score_bias = None
        if m.shared_expert_ffn_dim > 0:
            from moe.model.transformer import SwiGLU

            self.shared: nn.Module | None = SwiGLU(D, m.shared_expert_ffn_dim)
        else:
            self.shared = None
        gated = self.shared is not None and m.shared_expert_gate
        self.shared_gate = nn.Linear(D, 1, bias=False) if gated else None
        self.last_aux_loss: torch.Tensor | None = None
        self.last_stats: dict = {}
        # every token to every expert with weight 1 (a partitioned FFN then equals its dense
        # parent); set by split checks and analysis code, never by training
        self.force_all_experts = False

    def route(
        self, x_TD: torch.Tensor, domain_T: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(weights_TK, expert_ids_TK, router_logits_TE or None)."""
        T, E = x_TD.shape[0], self.num_experts
        if self.force_all_experts:
            ids = torch.arange(E, device=x_TD.device).expand(T, E).contiguous()
            return torch.ones(T, E, dtype=x_TD.dtype, device=x_TD.device), ids, None
        if self.router_kind == "domain":
            if domain_T is None:
                raise ValueError("router=domain needs the domain of every sequence")
            ids = domain_T.view(T, 1).long()
            return torch.ones(T, 1, dtype=x_TD.dtype, device=x_TD.device), ids, None
        h = x_TD
        if self.training and self.jitter > 0:
            h = h * torch.empty_like(h).uniform_(1 - self.jitter, 1 + self.jitter)
        logits_TE = self.router(h).float()
        weights_TK, ids_TK = select_experts(
            logits_TE, self.top_k, scoring=self.scoring, normalize=self.normalize,
            bias_E=self.score_bias,
        )  # fmt: skip
        if self.score_bias is not None and self.training:
            # index_add_, not bincount: no host synchronisation on CUDA
            ones_N = torch.ones(ids_TK.numel(), device=ids_TK.device)
            self.load_count.index_add_(0, ids_TK.reshape(-1), ones_N)
        return weights_TK.to(x_TD.dtype), ids_TK, logits_TE

    def aux_loss(self, logits_TE: torch.Tensor, ids_TK: torch.Tensor, B: int = 1) -> torch.Tensor:
        """lb_coef * Switch + seq_coef * sequence-wise + z_coef * z-loss, for T = B*L tokens.

        With p_TE the scores normalised over experts (softmax itself; sigmoid / its row sum) and
        f_e = E/(K*T) * #{(t, j): ids[t, j] = e} (1 for every expert at perfect balance):
            Switch          sum_e f_e * mean_t p_te, over the whole batch
            sequence-wise   the same over each sequence's L tokens alone, averaged over the B
                            sequences (DeepSeek-V3's complementary sequence-wise loss)
            z-loss          mean_t logsumexp(logits_t)^2 (ST-MoE)
        """
        E, K = self.num_experts, ids_TK.shape[1]
        p_TE = normalized_scores(logits_TE, self.scoring)
        frac_E = torch.bincount(ids_TK.reshape(-1), minlength=E).float() / ids_TK.numel()
        lb = E * (frac_E * p_TE.mean(0)).sum()  # E * sum_e (share of e) * (mean score e)
        z = torch.logsumexp(logits_TE, dim=-1).pow(2).mean()  # ST-MoE router z-loss
        total = self.lb_coef * lb + self.z_coef * z
        if self.seq_coef > 0:
            total = total + self.seq_coef * sequence_balance_loss(p_TE, ids_TK, B, E, K)
        return total

    def forward(self, x: torch.Tensor, domain: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x.shape
        x_TD = x.reshape(B * L, D)
        domain_T = None
        if domain is not None:
            domain_T = domain.view(B, 1).expand(B, L).reshape(-1)  # (T,)
        weights_TK, ids_TK, logits_TE = self.route(x_TD, domain_T)
        if self.router_kind == "domain" and not self.force_all_experts:
            if (ids_TK < 0).any() or (ids_TK >= self.num_experts).any():
                raise ValueError("a sequence's domain has no expert in this model")
        y_TD = moe_kernels.moe_mlp(
            x_TD, self.w1, self.w3, self.w2, ids_TK, weights_TK, backend=self.backend
        )
        if self.shared is not None:
            s_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                s_TD = torch.sigmoid(self.shared_gate(x_TD)) * s_TD  # (T, 1) * (T, D)
            y_TD = y_TD + s_TD
        self.last_aux_loss = (
            self.aux_loss(logits_TE, ids_TK, B) if logits_TE is not None and self.training
            else None
        )  # fmt: skip
        self.last_stats = {
            "expert_ids": ids_TK.detach(),  # (T, K), largest weight first
            "weights": weights_TK.detach(),  # (T, K)
            "num_experts": self.num_experts,
        }
        return y_TD.view(B, L, D)


def expert_scores(logits_TE: torch.Tensor, scoring: str) -> torch.Tensor:
    """s_TE: softmax over the experts, or each expert's sigmoid (float32; float64 stays)."""
    z_TE = logits_TE if logits_TE.dtype == torch.float64 else logits_TE.float()
    if scoring == "softmax":
        return z_TE.softmax(-1)
    if scoring == "sigmoid":
        return z_TE.sigmoid()
    raise ValueError(f"unknown scoring {scoring!r} (softmax, sigmoid)")


def normalized_scores(logits_TE: torch.Tensor, scoring: str) -> torch.Tensor:
    """p_TE: the scores as a distribution over experts (softmax itself; sigmoid / its row sum),
    what the balance losses average."""
    s_TE = expert_scores(logits_TE, scoring)
    return s_TE if scoring == "softmax" else s_TE / s_TE.sum(-1, keepdim=True)


def select_experts(
    logits_TE: torch.Tensor,
    k: int,
    *,
    scoring: str = "softmax",
    normalize: bool = True,
    bias_E: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK, expert_ids_TK): the k experts of highest s_TE + bias_E (largest first, ties
    to the lower id), weighted by s_TE alone (renormalised to sum 1 when `normalize`).

    The weights are gathered from s_TE, so they carry the gradient to the router logits on every
    path. Softmax scores with no bias choose through `moe_kernels.topk_route` (the fused Triton
    kernel on CUDA, torch elsewhere); sigmoid scores or a bias choose on the torch path (the
    kernel fuses softmax + top-k only), a stable sort of s + b."""
    s_TE = expert_scores(logits_TE, scoring)
    if scoring == "softmax" and bias_E is None:
        _, ids_TK = moe_kernels.topk_route(logits_TE, k, normalize=normalize)
    else:
        choice_TE = s_TE if bias_E is None else s_TE + bias_E.to(s_TE.dtype)
        ids_TK = torch.sort(choice_TE.detach(), dim=-1, descending=True, stable=True).indices
        ids_TK = ids_TK[:, :k].contiguous()
    weights_TK = s_TE.gather(1, ids_TK)
    if normalize:
        # sigmoid scores can underflow to 0 together: no 0/0 (a positive sum is left as it is)
        tiny = torch.finfo(weights_TK.dtype).tiny
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(tiny)
    return weights_TK, ids_TK


def sequence_balance_loss(
    p_TE: torch.Tensor, ids_TK: torch.Tensor, B: int, E: int, K: int
) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (without its coefficient): for each of the B
    sequences of L = T/B tokens, sum_e f_e * P_e with f_e = E/(K*L) * (assignments to e in the
    sequence) and P_e = the sequence's mean p_te; averaged over the sequences."""
    T = ids_TK.shape[0]
    L = T // B
    counts_BE = torch.zeros(B, E, device=ids_TK.device)
    counts_BE.scatter_add_(1, ids_TK.reshape(B, L * K), torch.ones(B, L * K, device=ids_TK.device))
    f_BE = counts_BE * (E / (K * L))
    P_BE = p_TE.reshape(B, L, E).mean(1)
    return (f_BE * P_BE).sum(-1).mean()


def update_router_biases(model: nn.Module) -> None:
    """Aux-free balancing, after an optimizer step: in every MoE layer with a score bias,
    b_e += bias_update_rate * sign(mean_e(load) - load_e), load_E the assignments its training
    forwards counted since the last update (summed over every rank), then the counts restart.
    An overloaded expert's bias falls, an underloaded one's rises. Layers without a bias are left
    alone. (Activation checkpointing recomputes a forward and counts it twice: every expert's
    load doubles, which leaves sign(mean - load) unchanged.)"""
    layers = [m for m in model.modules() if isinstance(m, MoEFFN) and m.score_bias is not None]
    if not layers:
        return
    with torch.no_grad():
        loads = [m.load_count for m in layers]
        same_E = len({t.numel() for t in loads}) == 1
        load_LE = torch.stack(loads) if same_E else None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if load_LE is not None:
                torch.distributed.all_reduce(load_LE)  # one collective for every layer
            else:
                for t in loads:
                    torch.distributed.all_reduce(t)
        for i, m in enumerate(layers):
            load_E = load_LE[i] if load_LE is not None else m.load_count
            # sign(0) = 0: with no count since the last update, nothing changes
            m.score_bias += m.bias_rate * torch.sign(load_E.mean() - load_E)
            m.load_count.zero_()


def dense_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor):
    """One expert in kernel layout (reference): x (T, D), w1/w3 (D, F), w2 (F, D)."""
    return (nnf.silu(x @ w1) * (x @ w3)) @ w2
