"""Parameter and FLOP accounting, from the config alone (no model needed).

Counts follow the usual convention (Kaplan et al. 2020; Chinchilla appendix F): a matmul with an
(m x n) weight costs 2*m*n FLOPs per token forward; backward costs twice the forward; causal
attention scores and values cost 2*T*C per token per layer forward (QK^T and AV, each 2*T*C,
halved by the causal mask). Embedding lookups and norms are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe.config import ModelConfig


@dataclass
class ParamCount:
    total: int  # every parameter
    active: int  # parameters used for one token (k of E experts)
    embedding: int  # token embedding (not in matmul FLOPs)


def _attn_params(c: ModelConfig) -> int:
    hd = c.head_size()
    return c.dim * c.n_heads * hd * 2 + c.dim * c.n_kv_heads * hd * 2  # wq, wo, wk, wv


def _ffn_params(dim: int, hidden: int) -> int:
    return 3 * dim * hidden


def count_params(config: ModelConfig) -> ParamCount:
    c = config.resolved()
    m = c.moe
    emb = c.vocab_size * c.dim
    head = 0 if c.tie_embeddings else c.vocab_size * c.dim
    norms = c.dim * (2 * c.n_layers + 1)
    per_layer_total = per_layer_active = _attn_params(c)
    if m.experts:
        E = len(m.experts)
        k = 1 if m.router == "domain" else m.top_k
        fe = m.expert_ffn_dim or c.ffn_dim
        shared = _ffn_params(c.dim, m.shared_expert_ffn_dim)
        router = c.dim * E if m.router == "learned" else 0
        per_layer_total += E * _ffn_params(c.dim, fe) + shared + router
        per_layer_active += k * _ffn_params(c.dim, fe) + shared + router
    else:
        per_layer_total += _ffn_params(c.dim, c.ffn_dim)
        per_layer_active += _ffn_params(c.dim, c.ffn_dim)
    total = emb + head + norms + c.n_layers * per_layer_total
    active = emb + head + norms + c.n_layers * per_layer_active
    return ParamCount(total=total, active=active, embedding=emb)


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    c = config.resolved()
    p = count_params(c)
    norms = c.dim * (2 * c.n_layers + 1)
    # the lm head is a matmul even when tied to the embedding
    matmul_params = (
        p.active - p.embedding - norms + (c.vocab_size * c.dim if c.tie_embeddings else 0)
    )
    # scores and values span the heads' width (n_heads * head size: dim unless heads were pruned)
    return 2.0 * matmul_params + 2.0 * c.n_layers * seq_len * c.n_heads * c.head_size()


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward + backward (3x forward) FLOPs per training token."""
    return 3.0 * forward_flops_per_token(config, seq_len)
