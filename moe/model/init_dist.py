"""Initialise a fresh model from a trained model's per-tensor weight distribution (`moe init`).

The question (moe-forge issue 15): trained transformer weights have characteristic per-tensor
distributions. Does a model started from those distributions (without the trained weights'
structure) train faster than one started from the default init, train at the same speed, or not
train at all? Each method below maps one trained tensor to one fresh tensor; methods are
registered by name in `METHODS` (a new one is one more `@register` function here: the CLI's help
and every "choose one of" message read the registry). Every method but `select` keeps the
source's shape.

    standard   the model's own default init (`Transformer.reset_parameters`): the control
    gaussian   N(mean, std²) with the trained tensor's mean and std
    histogram  inverse-CDF sampling from the trained tensor's empirical distribution (the
               piecewise-linear interpolation of its sorted values)
    shuffle    the trained tensor's values permuted elementwise at random (the exact multiset of
               values; permuting whole hidden units consistently would keep the function, which
               is not the experiment: an elementwise shuffle breaks it)
    spectrum   Q1 diag(s) Q2ᵀ with s the trained tensor's singular values and Q1, Q2 random
               orthonormal factors (Haar); tensors that are not 2-D fall back to `histogram`
               (a vector's only singular value is its norm: a random direction of that norm
               would flip the signs of RMSNorm gains, which no trained model has)
    select     weight selection (Xu et al. 2023, "Initializing Models with Larger Ones"): a
               smaller target takes evenly spaced indices i·n_src//n_tgt along every axis of
               each tensor (the same indices for the same axis size everywhere, so the residual
               stream stays consistent) and the first n_layers layers
    trained    the trained weights themselves: the upper bound

`keep_norms` copies the trained RMSNorm gains instead of applying the method to them;
`keep_embeddings` does the same for the token embedding and the output head. So the share of any
effect carried by the gains or the embeddings is separable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe.config import ConfigError, ModelConfig
from moe.config.registry import Registry
from moe.model.transformer import Transformer

# name -> function(trained tensor, fresh standard-init tensor, generator) -> new tensor
Method = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
METHODS: Registry[Method] = Registry("init method", field="init method", noun="method")
EMBEDDINGS = ("tok_emb.weight", "lm_head.weight")


def register(name: str) -> Callable[[Method], Method]:
    return METHODS.register(name)


def is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def is_embedding(name: str) -> bool:
    return name in EMBEDDINGS


@register("standard")
def standard(w: torch.Tensor, fresh: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return fresh.clone()


@register("trained")
def trained(w: torch.Tensor, fresh: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return w.clone()


@register("gaussian")
def gaussian(w: torch.Tensor, fresh: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    w64 = w.double()
    std = float(w64.std()) if w.numel() > 1 else 0.0
    z = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    return (float(w64.mean()) + std * z).to(w.dtype)


@register("histogram")
def histogram(w: torch.Tensor, fresh: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    v = w.double().flatten().sort().values  # (n,) the empirical quantile function at k/(n-1)
    n = v.numel()
    if n == 1:
        return w.clone()
    pos = torch.rand(w.numel(), generator=gen, dtype=torch.float64) * (n - 1)  # u · (n-1)
    lo = pos.floor().long().clamp(max=n - 2)
    frac = pos - lo
    out = v[lo] + frac * (v[lo + 1] - v[lo])  # inverse CDF, linear between order statistics
    return out.view(w.shape).to(w.dtype)


@register("shuffle")
def shuffle(w: torch.Tensor, fresh: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flat = w.flatten()
    return flat[torch.randperm(flat.numel(), generator=gen)].view(w.shape).clone()


def random_orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """(n, k) with orthonormal columns, Haar-distributed: QR of a Gaussian with R's signs fixed."""
    q, r = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(1))


@register("spectrum")
def spectrum(w: torch.Tensor, fresh: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if w.ndim != 2:
        return histogram(w, fresh, gen)
    s = torch.linalg.svdvals(w.double())  # (k,) k = min(m, n)
    m, n = w.shape
    u = random_orthonormal(m, s.numel(), gen)  # (m, k)
    v = random_orthonormal(n, s.numel(), gen)  # (n, k)
    return ((u * s) @ v.T).to(w.dtype)


def select_indices(n_src: int, n_tgt: int) -> torch.Tensor:
    """Evenly spaced indices of n_tgt among n_src: i · n_src // n_tgt (Xu et al. 2023's uniform
    selection). The same sizes always give the same indices (consistent selection)."""
    return torch.arange(n_tgt) * n_src // n_tgt


def select_tensor(w: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    out = w
    for axis, (ns, nt) in enumerate(zip(w.shape, shape)):
        if nt != ns:
            out = out.index_select(axis, select_indices(ns, nt))
    return out.clone()


@register("select")
def select(w: torch.Tensor, fresh: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Layers: a target of n_layers takes the source's first n_layers (the fresh model's names
    only go up to n_layers - 1); every other axis: `select_indices`."""
    return select_tensor(w, fresh.shape)


@dataclass
class InitResult:
    state_dict: dict[str, torch.Tensor]
    config: ModelConfig


def _shape_fields(cfg: ModelConfig) -> dict:
    keys = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "qkv_bias",
            "tie_embeddings")
    return {k: getattr(cfg, k) for k in keys} | {"experts": list(cfg.moe.experts)}


def init_state(
    source: dict[str, torch.Tensor],
    source_config: ModelConfig,
    method: str,
    target_config: ModelConfig | None = None,
    seed: int = 0,
    keep_norms: bool = False,
    keep_embeddings: bool = False,
) -> InitResult:
    """A fresh state dict for `target_config` (default: the source's) made by `method`.

    Every tensor gets its own stream of the generator seeded by `seed`; the `standard` tensors
    are those of `Transformer(target_config)` under `torch.manual_seed(seed)`."""
    fn = METHODS[method]  # an unknown method: "choose one of ..."
    src_cfg = source_config.resolved()
    tgt_cfg = (target_config or source_config).resolved()
    src_shape, tgt_shape = _shape_fields(src_cfg), _shape_fields(tgt_cfg)
    if method != "select" and src_shape != tgt_shape:
        diff = ", ".join(f"{k} {src_shape[k]} -> {tgt_shape[k]}" for k in src_shape
                         if src_shape[k] != tgt_shape[k])  # fmt: skip
        raise ConfigError(
            f"init method {method!r} needs the source's architecture, but the target differs "
            f"({diff}); only 'select' makes another (smaller) shape"
        )
    if method == "select":
        for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
            if tgt_shape[k] > src_shape[k]:
                raise ConfigError(
                    f"init method 'select': target model.{k}={tgt_shape[k]} is larger than the "
                    f"source's {src_shape[k]}; selection only makes a smaller model"
                )
        if (src_shape["experts"] != tgt_shape["experts"]
                or src_shape["qkv_bias"] != tgt_shape["qkv_bias"]
                or src_shape["tie_embeddings"] != tgt_shape["tie_embeddings"]):  # fmt: skip
            raise ConfigError(
                "init method 'select': the target must keep the source's experts, qkv_bias and "
                "tie_embeddings; only sizes may shrink"
            )
    from moe.model.flops import check_memory, memory_needed

    # a fresh model and the result: two target-sized state dicts beside the source
    check_memory(tgt_cfg, "init target", extra=memory_needed(tgt_cfg))
    torch.manual_seed(seed)
    fresh = Transformer(tgt_cfg).state_dict()
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, f in fresh.items():
        if name not in source:
            raise ConfigError(f"init: the source checkpoint has no tensor {name!r}")
        w = source[name].float()
        if method == "select":
            out[name] = select(w, f, gen)
            continue
        if w.shape != f.shape:
            raise ConfigError(f"init: tensor {name} has shape {tuple(w.shape)} in the source, "
                              f"{tuple(f.shape)} in the target")  # fmt: skip
        if (keep_norms and is_norm(name)) or (keep_embeddings and is_embedding(name)):
            out[name] = w.clone()
        else:
            out[name] = fn(w, f, gen).contiguous()
    return InitResult(out, tgt_cfg)
