"""Llama-style decoder-only transformer: RMSNorm, RoPE, grouped-query attention, SwiGLU FFN.

One model with a switch: each block's FFN is a dense SwiGLU, or a mixture of SwiGLU experts
(`moe.model.moe_layer.MoEFFN`) when `config.moe.experts` is non-empty. A plain `nn.Module`: it runs
without Lightning.

Shape legend: the one stated in moe_kernels/__init__.py, shared by the kernels and moe.model.
Here: B batch, L sequence length (positions of this call), T = B*L tokens, D model dim, H heads,
Hkv key/value heads, Dh head dim, F FFN hidden dim, V vocabulary, P past positions in the KV
cache (a call attends to P + L positions).

Incremental decoding: pass a `KVCache` (from `Transformer.new_cache`) to `forward`; each call
appends its tokens' keys/values and its positions continue where the cache left off (RoPE offset
by P), so generating one more token costs one position. Without a cache `forward` is unchanged.

Parameter names are stable (checkpoints, merges and the Hugging Face adapters rely on them):
    tok_emb.weight                      (V, D)
    layers.{i}.attn_norm.weight         (D,)
    layers.{i}.attn.{wq,wk,wv,wo}.weight
    layers.{i}.attn.{wq,wk,wv}.bias     only with qkv_bias (Qwen2)
    layers.{i}.ffn_norm.weight          (D,)
    layers.{i}.ffn.{w1,w3}.weight       (F, D)   dense FFN (w1 gate, w3 up)
    layers.{i}.ffn.w2.weight            (D, F)   dense FFN (down)
    layers.{i}.ffn.{...}                MoE FFN: see moe_layer.py
    norm.weight                         (D,)
    lm_head.weight                      (V, D)   absent when embeddings are tied
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from moe.config import ModelConfig, RopeScalingConfig

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 for stability under bf16 autocast
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(
    head_dim: int, max_len: int, theta: float, scaling: RopeScalingConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_len, head_dim/2) for rotary embeddings (Llama's half-split layout)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is not None:
        inv = llama3_frequencies(inv, scaling)
    ang = torch.outer(torch.arange(max_len, dtype=torch.float64), inv)  # (max_len, Dh/2)
    return ang.cos().float(), ang.sin().float()


def llama3_frequencies(inv: torch.Tensor, s: RopeScalingConfig) -> torch.Tensor:
    """Llama 3's long-context RoPE: slow rotations (wavelength above original_max_len /
    low_freq_factor) are slowed `factor` times more, fast ones (below original_max_len /
    high_freq_factor) are kept, and the band between blends the two linearly in
    original_max_len / wavelength."""
    wavelen = 2 * torch.pi / inv
    # 0 at the slow edge of the band, 1 at the fast edge
    blend = (s.original_max_len / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blend = blend.clamp(0.0, 1.0)
    return (1 - blend) * inv / s.factor + blend * inv


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, L, Dh); rotate the two halves of the head dim (same layout as HF Llama)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # (L, Dh/2)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class KVCache:
    """Keys and values of every layer for the positions processed so far, in buffers allocated
    once for `max_len` positions (writes are in place: no concatenation per token)."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch, n_kv_heads, max_len, head_dim)  # (B, Hkv, max_len, Dh)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0  # positions filled (P for the next call)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this call's k/v (B, Hkv, L, Dh) after the past ones; return all
        (B, Hkv, P + L, Dh). `length` advances once per forward (in `Transformer.forward`), not
        per layer."""
        P, L = self.length, k.shape[2]
        self.k[layer][:, :, P : P + L] = k
        self.v[layer][:, :, P : P + L] = v
        return self.k[layer][:, :, : P + L], self.v[layer][:, :, : P + L]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.head_size()
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, L, _ = x.shape
        if self.n_heads == 0:
            # every head pruned (moe prune --allow-empty): the block adds nothing here
            return torch.zeros_like(x)  # (B, L, D)
        q = self.wq(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)
        k = self.wk(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, Dh)
        v = self.wv(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            gqa = self.n_kv_heads != self.n_heads
            if gqa and x.device.type != "cpu":
                # CUDA: not every SDPA backend shares k/v heads itself (enable_gqa), and one
                # that cannot falls back to the slow math kernel; copies keep flash eligible
                rep = self.n_heads // self.n_kv_heads
                k = k.repeat_interleave(rep, dim=1)  # (B, H, L, Dh)
                v = v.repeat_interleave(rep, dim=1)
                gqa = False
            # CPU: the flash kernel reads each k/v head for its query heads, saving the copies
            # and their memory in the backward graph
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            # decoding: SDPA shares each k/v head among its query heads itself (enable_gqa)
            # instead of copying the whole cache once per token as repeat_interleave would
            P = cache.length
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, P + L, Dh)
            gqa = self.n_kv_heads != self.n_heads
            if P == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            elif L == 1:
                # one new token attends to every cached position and itself: no mask
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            else:
                # query i sits at position P + i and sees keys 0..P + i (is_causal would align
                # the mask to the top-left corner, as if there were no past)
                rows = torch.arange(P, P + L, device=x.device).unsqueeze(1)  # (L, 1)
                mask = torch.arange(k.shape[2], device=x.device).unsqueeze(0) <= rows  # (L, P + L)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, L, -1))  # (B, L, D)


class SwiGLU(nn.Module):
    """Dense FFN: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.moe.experts:
            from moe.model.moe_layer import MoEFFN

            self.ffn: nn.Module = MoEFFN(cfg, layer_idx)
        else:
            self.ffn = SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin, domain=None, cache: KVCache | None = None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.ffn(self.ffn_norm(x), domain=domain)


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, L, V); None with return_hidden=True
    loss: torch.Tensor | None = None  # mean cross-entropy over non-ignored targets (nats/token)
    aux_loss: torch.Tensor | None = None  # router losses (load balance + z), already weighted
    router_stats: list = field(default_factory=list)  # per MoE layer, see MoEFFN.last_stats
    hidden: torch.Tensor | None = None  # (B, L, D) final normed states, with return_hidden=True


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = config.resolved()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = (
            None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        )
        cos, sin = rope_tables(
            cfg.head_size(), cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling
        )
        # not part of the state dict: derived from the config
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @classmethod
    def from_state(cls, config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> Transformer:
        """The model `config` describes, holding `state_dict` (strict: every tensor present, named
        and shaped as the config says). How every checkpoint and in-memory state becomes a model;
        a path becomes one through moe.io.checkpoint.load_model."""
        model = cls(config)
        model.load_state_dict(state_dict)
        return model

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("wo.weight", "w2.weight", ".w2")):
                # scale residual-stream outputs by depth (GPT-2 style) to keep activations stable
                nn.init.normal_(p, std=std / (2 * self.config.n_layers) ** 0.5)
            else:
                nn.init.normal_(p, std=std)

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` positions (default: the
        model's context), in the dtype and on the device of the weights."""
        cfg = self.config
        max_len = cfg.max_seq_len if max_len is None else min(max_len, cfg.max_seq_len)
        w = self.tok_emb.weight
        return KVCache(
            cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_size(), max_len, w.dtype, w.device
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        domain: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_logits_only: bool = False,
        return_hidden: bool = False,
    ) -> ModelOutput:
        """input_ids (B, L); targets (B, L) with IGNORE_INDEX for no target; domain (B,) ids.

        cache: the tokens continue the cached positions (incremental decoding); the cache is
        extended in place. last_logits_only: logits (B, 1, V) for the last position only (a
        decoding step needs no more; saves the head's matmul over the prompt). return_hidden:
        no logits; `hidden` holds the final normed states for a chunked loss (training).
        """
        B, L = input_ids.shape
        P = 0 if cache is None else cache.length
        if P + L > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {P + L} exceeds the model's context max_seq_len="
                f"{self.config.max_seq_len}"
            )
        if last_logits_only and targets is not None:
            raise ValueError("last_logits_only=True has no logits to score targets against")
        if cache is not None and P + L > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions, {P + L} needed")
        x = self.tok_emb(input_ids)  # (B, L, D)
        cos, sin = self.rope_cos[P : P + L], self.rope_sin[P : P + L]
        recompute = (
            self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        )
        for layer in self.layers:
            if recompute and cache is None:
                # keep only each block's input; its activations are recomputed in the backward
                x = checkpoint(layer, x, cos, sin, domain=domain, use_reentrant=False)
            else:
                x = layer(x, cos, sin, domain=domain, cache=cache)
        if cache is not None:
            cache.length = P + L
        if last_logits_only:
            x = x[:, -1:]  # (B, 1, D)
        x = self.norm(x)
        if return_hidden:
            # the caller applies the head itself (moe.model.loss.linear_cross_entropy, chunked)
            out = ModelOutput(logits=None, hidden=x)
        else:
            out = ModelOutput(logits=F.linear(x, self.head_weight))  # (B, L, V)
        moe_layers = [lay.ffn for lay in self.layers if hasattr(lay.ffn, "last_stats")]
        if moe_layers:
            auxes = [m.last_aux_loss for m in moe_layers if m.last_aux_loss is not None]
            out.aux_loss = torch.stack(auxes).sum() if auxes else None
            out.router_stats = [m.last_stats for m in moe_layers]
        if targets is not None:
            if return_hidden:
                raise ValueError("return_hidden=True has no logits to score targets against")
            logits = out.logits
            out.loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)),
                targets.view(-1),
                ignore_index=IGNORE_INDEX,
            )
        return out

    @property
    def head_weight(self) -> torch.Tensor:
        """The output projection (V, D): the embedding when tied."""
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
        return n
