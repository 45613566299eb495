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
        shared += c.dim if m.shared_expert_gate and m.shared_expert_ffn_dim else 0  # its gate
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


# ---------------------------------------------------------------------------- memory

GIB = 1 << 30


def memory_needed(config: ModelConfig, training: bool = False, bytes_per_param: int = 4) -> int:
    """Bytes a model of `config` needs at the least: its weights (`bytes_per_param` each, 4 for
    fp32); training adds a gradient and AdamW's two moments per parameter (3 x as much again).
    Activations, data and the allocator's slack come on top: this is a lower bound, so a size it
    refuses can never fit."""
    n = count_params(config).total
    return n * bytes_per_param * (4 if training else 1)


def available_memory(device: str = "cpu") -> tuple[int, str] | None:
    """(bytes, what they are) free for a model on `device` (cpu | cuda), None when unknown.

    cpu: MemAvailable of /proc/meminfo (psutil's when it is installed), lowered to the room
    left under a cgroup (container) memory limit; cuda: the free memory of every visible GPU
    together (a sharded model can use all of it)."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None
        n = torch.cuda.device_count()
        free = sum(torch.cuda.mem_get_info(i)[0] for i in range(n))
        return free, f"free on {n} GPU{'s' if n > 1 else ''}"
    avail: int | None = None
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        avail = int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            pass
    if avail is None:
        return None
    what = "available (MemAvailable)"
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            used = int(f.read().strip())
        if limit != "max" and int(limit) - used < avail:
            avail, what = max(int(limit) - used, 0), "left under this container's memory limit"
    except (OSError, ValueError):
        pass
    return avail, what


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}{unit}"
    return f"{n:.3g}{unit}"


def describe_size(config: ModelConfig) -> str:
    """`dim 64, 2 layers, ffn 192, 3 experts`: the sizes that decide a model's parameters."""
    c = config.resolved()
    e = len(c.moe.experts)
    fe = c.moe.expert_ffn_dim or c.ffn_dim
    ffn = f"{e} experts of ffn {fe}" if e else f"ffn {c.ffn_dim}"
    return f"dim {c.dim}, {c.n_layers} layers, {ffn}, vocab {c.vocab_size}"


def check_memory(config: ModelConfig, what: str, training: bool = False, device: str = "cpu",
                 bytes_per_param: int = 4, extra: int = 0) -> None:  # fmt: skip
    """Refuse (ConfigError: one line naming the size and what is available) a model that cannot
    fit, before anything of it is allocated. `what` names where its size came from; `extra`:
    bytes needed beside it (the source model a surgery reads, a second copy, ...)."""
    from moe.config import ConfigError

    need = memory_needed(config, training, bytes_per_param) + extra
    have = available_memory(device)
    if have is None or need <= have[0]:
        return
    n = count_params(config).total
    use = (f"to train ({bytes_per_param} bytes per parameter for the weights, gradients and two "
           "AdamW moments each" if training else f"for its weights ({bytes_per_param} bytes per "
           "parameter")  # fmt: skip
    if extra >= 0.01 * need:
        use += f"; {extra / GIB:,.1f} GiB of it beside the model's parameters"
    where = f" on {device}" if device != "cpu" else ""
    raise ConfigError(
        f"{what}: {_human(n)} parameters ({describe_size(config)}) need at least "
        f"{need / GIB:,.1f} GiB {use}), but {have[0] / GIB:,.1f} GiB is {have[1]}{where}"
    )
