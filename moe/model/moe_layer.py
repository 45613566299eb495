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

Routers:
    learned  softmax over E logits, top-k, optional renormalisation (Switch / Mixtral style), with
             the Switch load-balancing loss and the ST-MoE router z-loss as auxiliary losses.
    domain   hard routing: every token of a sequence goes to its domain's expert (weight 1). The
             caller passes `domain` as expert indices (see `Transformer.forward`).
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
        D, F = cfg.dim, m.expert_ffn_dim or cfg.ffn_dim
        self.w1 = nn.Parameter(torch.empty(E, D, F))
        self.w3 = nn.Parameter(torch.empty(E, D, F))
        self.w2 = nn.Parameter(torch.empty(E, F, D))
        self.router = nn.Linear(D, E, bias=False) if m.router == "learned" else None
        if m.shared_expert_ffn_dim > 0:
            from moe.model.transformer import SwiGLU

            self.shared: nn.Module | None = SwiGLU(D, m.shared_expert_ffn_dim)
        else:
            self.shared = None
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
        weights_TK, ids_TK = moe_kernels.topk_route(logits_TE, self.top_k, normalize=self.normalize)
        return weights_TK.to(x_TD.dtype), ids_TK, logits_TE

    def aux_loss(self, logits_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        E = self.num_experts
        probs_TE = logits_TE.softmax(-1)
        # Switch Transformer load balance: E * sum_e (fraction of assignments to e) * (mean prob e)
        frac_E = torch.bincount(ids_TK.reshape(-1), minlength=E).float() / ids_TK.numel()
        lb = E * (frac_E * probs_TE.mean(0)).sum()
        z = torch.logsumexp(logits_TE, dim=-1).pow(2).mean()  # ST-MoE router z-loss
        return self.lb_coef * lb + self.z_coef * z

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
            y_TD = y_TD + self.shared(x_TD)
        self.last_aux_loss = (
            self.aux_loss(logits_TE, ids_TK) if logits_TE is not None and self.training else None
        )
        self.last_stats = {
            "expert_ids": ids_TK.detach(),  # (T, K), largest weight first
            "weights": weights_TK.detach(),  # (T, K)
            "num_experts": self.num_experts,
        }
        return y_TD.view(B, L, D)


def dense_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor):
    """One expert in kernel layout (reference): x (T, D), w1/w3 (D, F), w2 (F, D)."""
    return (nnf.silu(x @ w1) * (x @ w3)) @ w2
