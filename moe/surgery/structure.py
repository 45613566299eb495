"""Structural edits of a model's weights: pure functions (ModelConfig, state_dict) -> (ModelConfig,
state_dict) that remove, duplicate or add layers, attention heads, FFN neurons and model-dim
channels. Dense and MoE models, tied and untied embeddings, q/k/v biases: every tensor named in
`moe.model.transformer` is handled. Inputs are never modified.

Everything width-wise is one operation, `reindex`: for each axis (model-dim channels, key/value
head groups, FFN neurons) the new unit i is old unit src[i], or a new unit where src[i] == NEW.
Removal omits indices; zero-init growth appends NEW; Net2Net growth repeats indices. So every
removal and its growth inverse share one code path, and `keep_*` / `grow_*` are thin wrappers.

Function preservation (the growth methods are exact, tested to 1e-5 in fp32):
  * a NEW unit *reads* with fresh random weights (init_std) but *writes* zeros: a new FFN neuron
    has random w1/w3 rows and a zero w2 column; a new head random wq/wk/wv rows and zero wo
    columns; a new channel zero embedding/wo/w2 rows, so the residual stream's new channels stay
    0 for every input. Its outputs are zero, yet its gradients are not (a zero-init unit that
    also read zeros would never move).
  * Net2Net (a repeated index): the copies read identically, and the write-side weight (w2
    column, wo columns) of an old unit used k times is split into k shares that sum to 1:
    1/k each, or 1/k + noise·(r_j - mean r) to break the copies' symmetry (still exact: the
    shares still sum to 1).
  * RMSNorm averages x² over the model dim C, so C_old -> C_new channels (the new ones 0)
    scales rsqrt by sqrt(C_new/C_old): every norm gain is multiplied by sqrt(C_old/C_new), and
    norm_eps by C_old/C_new (rsqrt(mean x² + eps) has eps beside the shrunken mean).
    Removing channels applies the same factor, so keep_channels inverts grow_channels exactly.
  * Depth: `select_layers` (delete = omit, duplicate = repeat, SOLAR = a range twice) and
    `insert_identity` (LLaMA-Pro: a copy of a block with its wo and w2 outputs zeroed, so the
    block adds 0 to the residual stream).

Heads: key/value groups are kept or removed whole (GQA: query head h uses kv head h // g,
g = n_heads / n_kv_heads), so the model stays a valid Llama. Each layer may keep its own groups
(a list per layer) as long as every layer keeps the same number (the model has one n_heads).

Heads keep their size (ModelConfig.head_dim; None = dim / n_heads), so RoPE is unchanged and
heads and channels change independently: the new config sets head_dim only where
n_heads * head_dim no longer equals dim.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Sequence

import torch

from moe.config import ConfigError, ModelConfig

NEW = -1  # in an index list: a new unit (zero writes, random reads)

# per-layer index lists (a list of lists) or one list for every layer
IndexSpec = Sequence[int] | Sequence[Sequence[int]] | None

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


# ----------------------------------------------------------------------------- helpers


def head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim if cfg.head_dim is not None else cfg.dim // cfg.n_heads


def ffn_hidden(cfg: ModelConfig) -> int:
    """The hidden size of the FFN that `keep_ffn` edits: each expert's for MoE, else ffn_dim."""
    if cfg.moe.experts and cfg.moe.expert_ffn_dim:
        return cfg.moe.expert_ffn_dim
    return cfg.ffn_dim


def _with_ffn(cfg: ModelConfig, n: int) -> ModelConfig:
    if cfg.moe.experts and cfg.moe.expert_ffn_dim:
        return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, expert_ffn_dim=n))
    return dataclasses.replace(cfg, ffn_dim=n)


def _per_layer(spec: IndexSpec, n_layers: int, what: str) -> list[list[int]] | None:
    """One list per layer from a single list (the same in every layer) or a list of lists."""
    if spec is None:
        return None
    spec = list(spec)
    if spec and all(isinstance(s, (list, tuple)) for s in spec):
        if len(spec) != n_layers:
            raise ConfigError(f"{what}: {len(spec)} per-layer lists for a model of "
                              f"{n_layers} layers")  # fmt: skip
        out = [[int(i) for i in s] for s in spec]
    else:
        out = [[int(i) for i in spec]] * n_layers
    if len({len(s) for s in out}) > 1:
        sizes = sorted({len(s) for s in out})
        raise ConfigError(f"{what}: every layer must keep the same number of units (the model "
                          f"has one size per axis), got {sizes}")  # fmt: skip
    return out


def _check_src(src: list[int], n_old: int, what: str, allow_dup: bool,
               allow_empty: bool = False) -> None:  # fmt: skip
    if not src and not allow_empty:
        raise ConfigError(f"{what}: nothing would be left (every unit removed)")
    bad = [i for i in src if i != NEW and not 0 <= i < n_old]
    if bad:
        raise ConfigError(f"{what}: index {bad[0]} out of range (the model has {n_old})")
    if not allow_dup:
        dup = [i for i, c in Counter(src).items() if c > 1 and i != NEW]
        if dup:
            raise ConfigError(f"{what}: index {dup[0]} repeated; duplicating is not "
                              "function-preserving on this axis")  # fmt: skip


def _shares(src: list[int], noise: float, gen: torch.Generator) -> torch.Tensor:
    """Write-side factor of each new unit: an old unit used k times splits its output into k
    shares summing to 1 (Net2Net); noise perturbs the shares but keeps their sum."""
    out = torch.ones(len(src), dtype=torch.float64)
    pos: dict[int, list[int]] = {}
    for j, i in enumerate(src):
        if i != NEW:
            pos.setdefault(i, []).append(j)
    for js in pos.values():
        k = len(js)
        if k == 1:
            continue
        r = torch.rand(k, generator=gen, dtype=torch.float64)
        out[js] = 1.0 / k + noise * (r - r.mean())
    return out


def _take(t: torch.Tensor, axis: int, src: list[int], fill: str, std: float,
          gen: torch.Generator, block: int = 1) -> torch.Tensor:  # fmt: skip
    """Gather blocks of `block` rows along `axis` by src (NEW -> zeros or N(0, std²))."""
    src_t = torch.tensor(src, dtype=torch.long)  # (n,)
    idx = (src_t.clamp(min=0)[:, None] * block + torch.arange(block)).reshape(-1)  # (n*block,)
    out = t.index_select(axis, idx)
    new = (src_t == NEW).repeat_interleave(block).nonzero().squeeze(1)  # rows to fill
    if new.numel():
        shape = list(out.shape)
        shape[axis] = new.numel()
        if fill == "zero":
            vals = torch.zeros(shape, dtype=out.dtype)
        else:
            vals = (torch.randn(shape, generator=gen) * std).to(out.dtype)
        out.index_copy_(axis, new, vals)
    return out


def _scale(t: torch.Tensor, axis: int, shares: torch.Tensor, block: int = 1) -> torch.Tensor:
    s = shares.repeat_interleave(block).to(t.dtype)  # (n_units * block,)
    view = [1] * t.ndim
    view[axis] = -1
    return t * s.view(view)


# ----------------------------------------------------------------------------- depth


def select_layers(cfg: ModelConfig, sd: dict[str, torch.Tensor], src: Sequence[int]
                  ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:  # fmt: skip
    """New layer i = old layer src[i]: delete = omit, duplicate = repeat (SOLAR: a range twice)."""
    src = [int(i) for i in src]
    if not src:
        raise ConfigError("layers: removing every layer leaves no model")
    _check_src(src, cfg.n_layers, "layers", allow_dup=True)
    out: dict[str, torch.Tensor] = {}
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in sd.items():
        m = _LAYER.match(name)
        if m:
            per_layer.setdefault(int(m.group(1)), {})[m.group(2)] = t
        else:
            out[name] = t.clone()
    for i, s in enumerate(src):
        for rest, t in per_layer.get(s, {}).items():
            out[f"layers.{i}.{rest}"] = t.clone()
    return dataclasses.replace(cfg, n_layers=len(src)), out


def _is_output_proj(rest: str) -> bool:
    # the projections that write into the residual stream: attention wo, FFN/expert/shared w2
    return rest in ("attn.wo.weight", "ffn.w2.weight", "ffn.w2", "ffn.shared.w2.weight")


def insert_identity(cfg: ModelConfig, sd: dict[str, torch.Tensor], after: Sequence[int]
                    ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:  # fmt: skip
    """LLaMA-Pro: after each old layer p in `after`, a copy of p with its output projections
    (wo, w2) zeroed, so the new block adds nothing to the residual stream (exact)."""
    after = sorted(int(p) for p in after)
    if not after:
        raise ConfigError("insert_identity: no positions given")
    _check_src(after, cfg.n_layers, "identity block position", allow_dup=True)
    src, new_pos = [], []
    for i in range(cfg.n_layers):
        src.append(i)
        for _ in range(after.count(i)):
            new_pos.append(len(src))
            src.append(i)
    cfg2, out = select_layers(cfg, sd, src)
    for p in new_pos:
        for name in list(out):
            m = _LAYER.match(name)
            if m and int(m.group(1)) == p and _is_output_proj(m.group(2)):
                out[name] = torch.zeros_like(out[name])
    return cfg2, out


# ----------------------------------------------------------------------------- width


def reindex(
    cfg: ModelConfig,
    sd: dict[str, torch.Tensor],
    channels: Sequence[int] | None = None,
    kv_groups: IndexSpec = None,
    ffn: IndexSpec | Sequence[Sequence[Sequence[int]]] = None,
    noise: float = 0.0,
    seed: int = 0,
    allow_empty_heads: bool = False,
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The general width edit (see the module docstring). None = the axis unchanged.

    channels: model-dim channels, one list for the whole model (the residual stream is shared);
        NEW appends zero channels; repeats are refused (not function-preserving).
    kv_groups: key/value head groups (with their g query heads), one list or one per layer.
    ffn: FFN neurons, one list, one per layer, or (MoE) one per layer per expert [[[...]]].
    noise: Net2Net share noise for repeated heads/neurons; seed: new weights and noise.
    allow_empty_heads: every head may go (the model runs with n_heads = 0: attention adds 0).
    """
    C, Hkv, L = cfg.dim, cfg.n_kv_heads, cfg.n_layers
    hd, g = head_dim(cfg), (cfg.n_heads // cfg.n_kv_heads if cfg.n_kv_heads else 1)
    E = len(cfg.moe.experts)
    gen = torch.Generator().manual_seed(seed)
    std = cfg.init_std

    ch = None if channels is None else [int(i) for i in channels]
    if ch is not None:
        _check_src(ch, C, "channels", allow_dup=False)
    kv = _per_layer(kv_groups, L, "heads")
    for lay in kv or []:
        _check_src(
            lay, Hkv, "heads (key/value groups)", allow_dup=True, allow_empty=allow_empty_heads
        )
    ff = _ffn_spec(ffn, L, E)
    for lay in ff or []:
        for e_src in lay:
            _check_src(e_src, ffn_hidden(cfg), "ffn neurons", allow_dup=True)

    C2 = C if ch is None else len(ch)
    Hkv2 = Hkv if kv is None else len(kv[0])
    H2 = Hkv2 * g
    F2 = ffn_hidden(cfg) if ff is None else len(ff[0][0])
    cfg2 = _with_ffn(dataclasses.replace(cfg, dim=C2, n_heads=H2, n_kv_heads=Hkv2), F2)
    # explicit head_dim only where dim / n_heads no longer gives it (keeps plain configs plain)
    cfg2 = dataclasses.replace(cfg2, head_dim=None if H2 and H2 * hd == C2 else hd)
    # rsqrt(mean x² + eps): the mean shrinks by C/C2, so eps must too for exactness
    cfg2 = dataclasses.replace(cfg2, norm_eps=cfg.norm_eps * C / C2)
    norm_gain = math.sqrt(C / C2)

    def cols(t: torch.Tensor, axis: int, write: bool) -> torch.Tensor:
        """The model-dim axis of a tensor: new channels read randomly, write zeros."""
        if ch is None:
            return t
        return _take(t, axis, ch, "zero" if write else "rand", std, gen)

    def heads(t: torch.Tensor, axis: int, lay: int, query: bool, write: bool) -> torch.Tensor:
        if kv is None:
            return t
        src = kv[lay]
        if query:  # the g query heads of each kv group are consecutive: one block of g*hd
            t = _take(t, axis, src, "zero" if write else "rand", std, gen, block=g * hd)
        else:
            t = _take(t, axis, src, "zero" if write else "rand", std, gen, block=hd)
        if write:
            t = _scale(t, axis, _shares(src, noise, gen), block=g * hd)
        return t

    def neurons(t: torch.Tensor, axis: int, src: list[int], write: bool) -> torch.Tensor:
        t = _take(t, axis, src, "zero" if write else "rand", std, gen)
        return _scale(t, axis, _shares(src, noise, gen)) if write else t

    out: dict[str, torch.Tensor] = {}
    for name in sorted(sd, key=_order):  # a fixed order: the generator's draws are reproducible
        t = sd[name].clone()
        m = _LAYER.match(name)
        lay, rest = (int(m.group(1)), m.group(2)) if m else (-1, name)
        if rest == "tok_emb.weight":  # (V, C): written into the residual stream
            t = cols(t, 1, write=True)
        elif rest == "lm_head.weight":  # (V, C): reads the final normed stream
            t = cols(t, 1, write=False)
        elif rest.endswith("norm.weight"):  # (C,)
            t = cols(t, 0, write=False) if ch is None else _take(t, 0, ch, "zero", std, gen)
            if ch is not None:
                t[torch.tensor(ch) == NEW] = 1.0
            t = t * norm_gain
        elif rest in ("attn.wq.weight", "attn.wk.weight", "attn.wv.weight"):  # (H*Dh | Hkv*Dh, C)
            t = heads(cols(t, 1, write=False), 0, lay, query=rest == "attn.wq.weight", write=False)
        elif rest in ("attn.wq.bias", "attn.wk.bias", "attn.wv.bias"):  # (H*Dh | Hkv*Dh,)
            if kv is not None:
                blk = g * hd if rest == "attn.wq.bias" else hd
                t = _take(t, 0, kv[lay], "zero", std, gen, block=blk)
        elif rest == "attn.wo.weight":  # (C, H*Dh)
            t = heads(cols(t, 0, write=True), 1, lay, query=True, write=True)
        elif rest in ("ffn.w1.weight", "ffn.w3.weight"):  # dense (F, C)
            t = cols(t, 1, write=False)
            if ff is not None:
                t = neurons(t, 0, ff[lay][0], write=False)
        elif rest == "ffn.w2.weight":  # dense (C, F)
            t = cols(t, 0, write=True)
            if ff is not None:
                t = neurons(t, 1, ff[lay][0], write=True)
        elif rest in ("ffn.w1", "ffn.w3"):  # experts (E, C, Fe)
            t = cols(t, 1, write=False)
            if ff is not None:
                t = torch.stack([neurons(t[e], 1, ff[lay][e], write=False) for e in range(E)])
        elif rest == "ffn.w2":  # experts (E, Fe, C)
            t = cols(t, 2, write=True)
            if ff is not None:
                t = torch.stack([neurons(t[e], 0, ff[lay][e], write=True) for e in range(E)])
        elif rest == "ffn.router.weight" or rest in (
            "ffn.shared.w1.weight",
            "ffn.shared.w3.weight",
        ):  # (E | Fs, C)
            t = cols(t, 1, write=False)
        elif rest == "ffn.shared.w2.weight":  # (C, Fs)
            t = cols(t, 0, write=True)
        elif rest == "ffn.score_bias":  # (E,): one per expert, no width
            pass
        else:
            raise ConfigError(f"width: tensor {name!r} is not one this model has")
        out[name] = t.contiguous()
    return cfg2, out


def _order(name: str) -> tuple:
    m = _LAYER.match(name)
    return (int(m.group(1)), m.group(2)) if m else (-1, name)


def _ffn_spec(spec, n_layers: int, n_experts: int) -> list[list[list[int]]] | None:
    """[layer][expert] -> index list (a dense model has one 'expert')."""
    if spec is None:
        return None
    n_e = max(n_experts, 1)
    spec = list(spec)
    if (
        spec
        and all(isinstance(s, (list, tuple)) for s in spec)
        and spec[0]
        and all(isinstance(e, (list, tuple)) for e in spec[0])
    ):  # per layer per expert
        if not n_experts:
            raise ConfigError("ffn: per-expert neuron lists given for a dense model")
        if len(spec) != n_layers or any(len(s) != n_experts for s in spec):
            raise ConfigError(f"ffn: per-expert lists must be [{n_layers} layers][{n_experts} "
                              "experts][neurons]")  # fmt: skip
        out = [[[int(i) for i in e] for e in s] for s in spec]
    else:
        out = [[lay] * n_e for lay in _per_layer(spec, n_layers, "ffn")]
    if len({len(e) for s in out for e in s}) > 1:
        raise ConfigError("ffn: every layer and expert must keep the same number of neurons")
    return out


# ----------------------------------------------------------------------------- removal


def keep_width(cfg, sd, channels=None, kv_groups=None, allow_empty_heads: bool = False):
    """Keep the given model-dim channels and/or key/value head groups (no NEW, no repeats)."""
    for what, spec in (("channels", channels), ("heads", kv_groups)):
        flat = [] if spec is None else [i for s in spec for i in (s if isinstance(
            s, (list, tuple)) else [s])]  # fmt: skip
        if NEW in flat:
            raise ConfigError(f"keep {what}: index {NEW} is not an index")
    if kv_groups is not None:
        for lay in _per_layer(kv_groups, cfg.n_layers, "heads"):
            _check_src(
                lay,
                cfg.n_kv_heads,
                "heads (key/value groups)",
                allow_dup=False,
                allow_empty=allow_empty_heads,
            )
    return reindex(
        cfg, sd, channels=channels, kv_groups=kv_groups, allow_empty_heads=allow_empty_heads
    )


def keep_heads(cfg, sd, keep_kv: IndexSpec, channels: Sequence[int] | None = None,
               allow_empty: bool = False):  # fmt: skip
    """Keep whole key/value groups (with their query heads): one list, or one per layer of
    equal lengths; each head keeps its size (head_dim)."""
    return keep_width(cfg, sd, channels=channels, kv_groups=keep_kv, allow_empty_heads=allow_empty)


def keep_channels(cfg, sd, keep: Sequence[int], kv_groups: IndexSpec = None):
    """Keep model-dim channels (norm gains rescaled by sqrt(C_old/C_new))."""
    return keep_width(cfg, sd, channels=keep, kv_groups=kv_groups)


def keep_ffn(cfg, sd, keep):
    """Keep FFN neurons: one list, one per layer, or (MoE) one per layer per expert."""
    spec = _ffn_spec(keep, cfg.n_layers, len(cfg.moe.experts))
    for lay in spec:
        for e in lay:
            if NEW in e:
                raise ConfigError(f"keep ffn: index {NEW} is not an index")
            _check_src(e, ffn_hidden(cfg), "ffn neurons", allow_dup=False)
    return reindex(cfg, sd, ffn=keep)


# ----------------------------------------------------------------------------- growth


GROW_METHODS = ("zero", "split")


def _grown(n_old: int, n_new: int, method: str, what: str, gen: torch.Generator) -> list[int]:
    if n_new < n_old:
        raise ConfigError(f"grow {what}: {n_new} is smaller than the model's {n_old}; "
                          "use shrink to remove units")  # fmt: skip
    if method not in GROW_METHODS:
        raise ConfigError(f"grow: unknown method {method!r}; choose one of "
                          f"{', '.join(GROW_METHODS)}")  # fmt: skip
    extra = n_new - n_old
    if method == "zero":
        return list(range(n_old)) + [NEW] * extra
    # Net2Net: split distinct randomly chosen units (each at most once while possible)
    picks: list[int] = []
    while len(picks) < extra:
        perm = torch.randperm(n_old, generator=gen).tolist()
        picks += perm[: extra - len(picks)]
    return list(range(n_old)) + picks


def grow_ffn(cfg, sd, ffn_dim: int, method: str = "zero", noise: float = 0.0, seed: int = 0):
    """More FFN neurons (each expert's for MoE): zero-init w2 columns, or Net2Net split."""
    gen = torch.Generator().manual_seed(seed + 1)
    src = _grown(ffn_hidden(cfg), ffn_dim, method, "ffn", gen)
    return reindex(cfg, sd, ffn=src, noise=noise, seed=seed)


def grow_width(cfg, sd, dim: int | None = None, n_kv_heads: int | None = None,
               method: str = "zero", noise: float = 0.0, seed: int = 0):  # fmt: skip
    """A larger model dim (zero channels) and/or more key/value head groups, each with its
    n_heads / n_kv_heads query heads of the same head_dim (new heads write zeros, or are
    Net2Net-split copies of existing groups)."""
    gen = torch.Generator().manual_seed(seed + 1)
    ch = None if dim is None else _grown(cfg.dim, dim, "zero", "dim", gen)
    kv = None if n_kv_heads is None else _grown(cfg.n_kv_heads, n_kv_heads, method, "heads", gen)
    if ch is None and kv is None:
        raise ConfigError("grow: give dim and/or n_kv_heads")
    return reindex(cfg, sd, channels=ch, kv_groups=kv, noise=noise, seed=seed)
