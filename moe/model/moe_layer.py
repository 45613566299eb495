"""Mixture-of-experts FFN: a router picks experts per token, `moe_kernels.moe_mlp` runs them.

Legend: B batch, T sequence length, N = B*T tokens, C model dim, E experts, K experts per token,
Fe expert hidden dim, Fs shared-expert hidden dim.

Parameters (names are part of the checkpoint format):
    w1  (E, C, Fe)  gate projections, kernel layout (x @ w1[e])
    w3  (E, C, Fe)  up projections
    w2  (E, Fe, C)  down projections
    router.weight (E, C)           learned router only
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
import torch.nn.functional as F

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
        C, Fe = cfg.dim, m.expert_ffn_dim or cfg.ffn_dim
        self.w1 = nn.Parameter(torch.empty(E, C, Fe))
        self.w3 = nn.Parameter(torch.empty(E, C, Fe))
        self.w2 = nn.Parameter(torch.empty(E, Fe, C))
        self.router = nn.Linear(C, E, bias=False) if m.router == "learned" else None
        if m.shared_expert_ffn_dim > 0:
            from moe.model.transformer import SwiGLU

            self.shared: nn.Module | None = SwiGLU(C, m.shared_expert_ffn_dim)
        else:
            self.shared = None
        self.last_aux_loss: torch.Tensor | None = None
        self.last_stats: dict = {}
        # every token to every expert with weight 1 (a partitioned FFN then equals its dense
        # parent); set by split checks and analysis code, never by training
        self.force_all_experts = False

    def route(
        self, x_NC: torch.Tensor, domain_N: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(weights_NK, expert_ids_NK, router_logits_NE or None)."""
        N, E = x_NC.shape[0], self.num_experts
        if self.force_all_experts:
            ids = torch.arange(E, device=x_NC.device).expand(N, E).contiguous()
            return torch.ones(N, E, dtype=x_NC.dtype, device=x_NC.device), ids, None
        if self.router_kind == "domain":
            if domain_N is None:
                raise ValueError("router=domain needs the domain of every sequence")
            ids = domain_N.view(N, 1).long()
            return torch.ones(N, 1, dtype=x_NC.dtype, device=x_NC.device), ids, None
        h = x_NC
        if self.training and self.jitter > 0:
            h = h * torch.empty_like(h).uniform_(1 - self.jitter, 1 + self.jitter)
        logits_NE = self.router(h).float()
        weights_NK, ids_NK = moe_kernels.topk_route(logits_NE, self.top_k, normalize=self.normalize)
        return weights_NK.to(x_NC.dtype), ids_NK, logits_NE

    def aux_loss(self, logits_NE: torch.Tensor, ids_NK: torch.Tensor) -> torch.Tensor:
        E = self.num_experts
        probs_NE = logits_NE.softmax(-1)
        # Switch Transformer load balance: E * sum_e (fraction of assignments to e) * (mean prob e)
        frac_E = torch.bincount(ids_NK.reshape(-1), minlength=E).float() / ids_NK.numel()
        lb = E * (frac_E * probs_NE.mean(0)).sum()
        z = torch.logsumexp(logits_NE, dim=-1).pow(2).mean()  # ST-MoE router z-loss
        return self.lb_coef * lb + self.z_coef * z

    def forward(self, x: torch.Tensor, domain: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        x_NC = x.reshape(B * T, C)
        domain_N = None
        if domain is not None:
            domain_N = domain.view(B, 1).expand(B, T).reshape(-1)  # (N,)
        weights_NK, ids_NK, logits_NE = self.route(x_NC, domain_N)
        if self.router_kind == "domain" and not self.force_all_experts:
            if (ids_NK < 0).any() or (ids_NK >= self.num_experts).any():
                raise ValueError("a sequence's domain has no expert in this model")
        y_NC = moe_kernels.moe_mlp(
            x_NC, self.w1, self.w3, self.w2, ids_NK, weights_NK, backend=self.backend
        )
        if self.shared is not None:
            y_NC = y_NC + self.shared(x_NC)
        self.last_aux_loss = (
            self.aux_loss(logits_NE, ids_NK) if logits_NE is not None and self.training else None
        )
        self.last_stats = {
            "expert_ids": ids_NK.detach(),  # (N, K), largest weight first
            "weights": weights_NK.detach(),  # (N, K)
            "num_experts": self.num_experts,
        }
        return y_NC.view(B, T, C)


def dense_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor):
    """One expert in kernel layout (reference): x (N, C), w1/w3 (C, F), w2 (F, C)."""
    return (F.silu(x @ w1) * (x @ w3)) @ w2
