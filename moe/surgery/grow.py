"""`moe grow`: a larger model that computes exactly what the checkpoint computes.

Width (moe/surgery/structure.py does the tensor work):
    --ffn-dim N      more FFN neurons (each expert's, for an MoE)
    --kv-heads N     more key/value head groups, each with its query heads (head_dim unchanged,
                     so RoPE is too)
    --dim N          a larger model dim: zero channels, RMSNorm gains x sqrt(d_old/d_new)
    --method zero    new units write zeros (read with fresh random weights) -- exact
             split   Net2Net: new units copy existing ones, the write side split between the
                     copies (shares perturbed by --noise, still summing to 1) -- exact
Depth (after the width changes):
    --identity-after 1,3   LLaMA-Pro: after each listed layer a copy of it whose output
                           projections (wo, w2) are zero -- exact
    --duplicate A:B        SOLAR depth up-scaling: layers A..B-1 once more after layer B-1
    --layers 0,1,1,2       the general form: new layer i = old layer src[i]

The checkpoint keeps its tokenizer and records its lineage (parents, base_id, family, tokens and
FLOPs carried over: growing trains nothing).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from moe.config import ConfigError, ModelConfig
from moe.surgery.structure import (
    GROW_METHODS,
    _with_ffn,
    grow_ffn,
    grow_width,
    insert_identity,
    select_layers,
)


@dataclass
class GrowSpec:
    ffn_dim: int | None = None
    dim: int | None = None
    kv_heads: int | None = None
    method: str = "zero"
    noise: float = 0.0
    identity_after: list[int] | None = None
    duplicate: tuple[int, int] | None = None
    layers: list[int] | None = None
    seed: int = 0

    def is_exact(self) -> bool:
        """Every growth here preserves the function except SOLAR duplication / --layers."""
        return self.duplicate is None and self.layers is None

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def parse_ints(s: str | None, what: str) -> list[int] | None:
    if s is None:
        return None
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what}: {s!r} is not a comma-separated list of integers") from None


def parse_range(s: str | None, what: str) -> tuple[int, int] | None:
    if s is None:
        return None
    a, sep, b = s.partition(":")
    try:
        lo, hi = int(a), int(b)
    except ValueError:
        raise ConfigError(f"{what}: {s!r} is not a layer range A:B") from None
    if not sep or lo >= hi:
        raise ConfigError(f"{what}: {s!r} is not a layer range A:B with A < B")
    return lo, hi


def check_spec(cfg: ModelConfig, s: GrowSpec) -> None:
    """Every mistake, before any tensor is touched."""
    if s.method not in GROW_METHODS:
        raise ConfigError(f"grow --method: unknown method {s.method!r}; choose one of "
                          f"{', '.join(GROW_METHODS)}")  # fmt: skip
    if not 0.0 <= s.noise < 1.0:
        raise ConfigError(f"grow --noise: {s.noise} is not in [0, 1)")
    ffn = cfg.moe.expert_ffn_dim if cfg.moe.experts and cfg.moe.expert_ffn_dim else cfg.ffn_dim
    for what, new, old in (("--ffn-dim", s.ffn_dim, ffn), ("--dim", s.dim, cfg.dim),
                           ("--kv-heads", s.kv_heads, cfg.n_kv_heads)):  # fmt: skip
        if new is not None and new < old:
            raise ConfigError(f"grow {what} {new} is smaller than the model's {old}; "
                              "use moe shrink to make a model smaller")  # fmt: skip
    if sum(x is not None for x in (s.identity_after, s.duplicate, s.layers)) > 1:
        raise ConfigError("grow: give one of --identity-after, --duplicate, --layers")
    n = cfg.n_layers
    for what, idx in (("--identity-after", s.identity_after), ("--layers", s.layers)):
        if idx is not None:
            if not idx:
                raise ConfigError(f"grow {what}: no layers given")
            bad = [i for i in idx if not 0 <= i < n]
            if bad:
                raise ConfigError(f"grow {what}: layer {bad[0]} out of range (the model has "
                                  f"{n} layers, 0..{n - 1})")  # fmt: skip
    if s.layers is not None and len(s.layers) < n:
        raise ConfigError(f"grow --layers: {len(s.layers)} layers is fewer than the model's "
                          f"{n}; use moe shrink to remove layers")  # fmt: skip
    if s.duplicate is not None and not (0 <= s.duplicate[0] < s.duplicate[1] <= n):
        raise ConfigError(f"grow --duplicate {s.duplicate[0]}:{s.duplicate[1]}: needs "
                          f"0 <= A < B <= {n}")  # fmt: skip
    if all(x is None for x in (s.ffn_dim, s.dim, s.kv_heads, s.identity_after, s.duplicate,
                               s.layers)):  # fmt: skip
        raise ConfigError("grow: nothing to do; give --ffn-dim, --dim, --kv-heads, "
                          "--identity-after, --duplicate or --layers")  # fmt: skip


def grown_config(cfg: ModelConfig, s: GrowSpec) -> ModelConfig:
    """The architecture `grow_state` makes, from the config alone (to size it before growing)."""
    cfg = cfg.resolved()
    hd = cfg.head_size()
    if s.ffn_dim is not None:
        cfg = _with_ffn(cfg, s.ffn_dim)
    if s.dim is not None or s.kv_heads is not None:
        kv = s.kv_heads if s.kv_heads is not None else cfg.n_kv_heads
        g = cfg.n_heads // cfg.n_kv_heads if cfg.n_kv_heads else 1
        cfg = dataclasses.replace(cfg, dim=s.dim or cfg.dim, n_kv_heads=kv, n_heads=kv * g,
                                  head_dim=hd)  # fmt: skip
    n = cfg.n_layers + len(s.identity_after or ()) + (
        s.duplicate[1] - s.duplicate[0] if s.duplicate else 0)  # fmt: skip
    return dataclasses.replace(cfg, n_layers=len(s.layers) if s.layers is not None else n)


def grow_state(cfg: ModelConfig, sd: dict[str, torch.Tensor], s: GrowSpec
               ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:  # fmt: skip
    check_spec(cfg, s)
    if s.ffn_dim is not None:
        cfg, sd = grow_ffn(cfg, sd, s.ffn_dim, method=s.method, noise=s.noise, seed=s.seed)
    if s.dim is not None or s.kv_heads is not None:
        cfg, sd = grow_width(cfg, sd, dim=s.dim, n_kv_heads=s.kv_heads, method=s.method,
                             noise=s.noise, seed=s.seed)  # fmt: skip
    if s.identity_after is not None:
        cfg, sd = insert_identity(cfg, sd, s.identity_after)
    if s.duplicate is not None:
        a, b = s.duplicate
        cfg, sd = select_layers(cfg, sd, duplicate_range(cfg.n_layers, a, b))
    if s.layers is not None:
        cfg, sd = select_layers(cfg, sd, s.layers)
    return cfg, sd


def duplicate_range(n_layers: int, a: int, b: int) -> list[int]:
    """SOLAR: 0..B-1, then A..n-1 (layers A..B-1 appear twice, in order)."""
    return list(range(b)) + list(range(a, n_layers))


def write_surgery_checkpoint(src_dir: Path, ck, cfg: ModelConfig, sd: dict[str, torch.Tensor],
                             out: str | Path, kind: str, record: dict, overwrite: bool,
                             trained: dict | None = None, tokenizer=None) -> Path:  # fmt: skip
    """The edited model as a checkpoint: the source's tokenizer, its data recipe (so `moe eval`
    evaluates on the same held-out data), lineage, and what was done (`record`). `tokenizer`:
    another one than the source's (moe retokenize)."""
    from moe.data.tokenizer import carried_tokenizer
    from moe.io.checkpoint import make_meta, save_checkpoint

    src_recipe = ck.meta.get("recipe") if isinstance(ck.meta.get("recipe"), dict) else {}
    recipe = {k: src_recipe[k] for k in ("data", "seed") if k in src_recipe}
    recipe[kind] = dict(record, source=str(src_dir))
    meta = make_meta(
        kind=kind,
        parents=[ck.meta.get("id")],
        base_id=ck.meta.get("base_id") or ck.meta.get("id"),
        family=ck.meta.get("family"),
        domain=ck.meta.get("domain"),
        tokens_seen=int(ck.meta.get("tokens_seen", 0)),
        train_flops=float(ck.meta.get("train_flops", 0.0)),
        recipe=recipe,
        **({"surgery": trained} if trained else {}),
    )
    tok = tokenizer if tokenizer is not None else carried_tokenizer(src_dir, ck.config.vocab_size)
    return save_checkpoint(out, sd, cfg, meta, overwrite=overwrite, tokenizer=tok)


def grow_checkpoint(source: str | Path, out: str | Path, spec: GrowSpec,
                    overwrite: bool = False) -> Path:  # fmt: skip
    """`moe grow`: read, check, grow, write (atomically; nothing written on a mistake)."""
    from moe.eval.evaluate import resolve_checkpoint
    from moe.io.checkpoint import CheckpointError, load_checkpoint, read_config
    from moe.io.output import claim
    from moe.model.flops import check_memory, memory_needed

    src_dir = resolve_checkpoint(source)
    if Path(out).exists() and not overwrite:
        raise CheckpointError(f"checkpoint {out} already exists (pass --overwrite to replace it)")
    with claim(out, [source]):  # moe/io/output.py
        src_cfg = read_config(src_dir)
        check_spec(src_cfg, spec)
        # the grown model's weights must fit beside the source's, before either is read
        check_memory(grown_config(src_cfg, spec), f"grow {source}", extra=memory_needed(src_cfg))
        ck = load_checkpoint(src_dir)
        cfg, sd = grow_state(ck.config, ck.state_dict, spec)
        return write_surgery_checkpoint(src_dir, ck, cfg, sd, out, "grow", spec.describe(),
                                        overwrite)
