"""`moe init`: a checkpoint initialised from a trained one's weight distribution.

The methods themselves are pure functions on tensors (moe/model/init_dist.py); this writes the
result as a checkpoint with lineage, under the output rule of moe/io/output.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moe.config import ConfigError, ModelConfig
from moe.data.tokenizer import carried_tokenizer
from moe.io.checkpoint import load_checkpoint, make_meta, resolve_checkpoint, save_checkpoint
from moe.io.output import claim
from moe.model.init_dist import METHODS, init_state


def init_checkpoint(
    source: str | Path,
    method: str,
    out: str | Path,
    seed: int = 0,
    keep_norms: bool = False,
    keep_embeddings: bool = False,
    overrides: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """`moe init`: write a checkpoint initialised from `source` by `method`, with lineage.

    `overrides` (`model.dim=48`, ...) set the target's architecture (for `select`)."""
    if method not in METHODS:  # before reading anything
        raise ConfigError(
            f"init method: unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}"
        )
    with claim(out, [source]):  # moe/io/output.py
        src_dir = resolve_checkpoint(source)
        ck = load_checkpoint(src_dir)  # verifies the weights' sha256
        tgt = _apply_overrides(ck.config, overrides or [])
        res = init_state(ck.state_dict, ck.config, method, tgt, seed, keep_norms, keep_embeddings)
        carried = method in ("trained", "select")
        meta = make_meta(
            kind="init",
            parents=[ck.meta.get("id")],
            tokens_seen=int(ck.meta.get("tokens_seen", 0)) if carried else 0,
            train_flops=float(ck.meta.get("train_flops", 0.0)) if carried else 0.0,
            recipe={"init": {"from": str(src_dir), "method": method, "seed": seed,
                             "keep_norms": keep_norms, "keep_embeddings": keep_embeddings,
                             "overrides": list(overrides or [])}},  # fmt: skip
            init={"source_id": ck.meta.get("id"), "source_tokens_seen": ck.meta.get("tokens_seen"),
                  "source_train_flops": ck.meta.get("train_flops"), "method": method},
        )
        tok = carried_tokenizer(src_dir, ck.config.vocab_size)
        return save_checkpoint(out, res.state_dict, res.config, meta, overwrite=overwrite,
                               tokenizer=tok)  # fmt: skip


def _apply_overrides(cfg: ModelConfig, overrides: list[str]) -> ModelConfig:
    kw = {}
    names = {f.name: f for f in dataclasses.fields(ModelConfig)}
    for o in overrides:
        key, sep, val = o.partition("=")
        key = key.strip().removeprefix("model.")
        if not sep or key not in names or key in ("moe", "rope_scaling"):
            raise ConfigError(f"moe init: override {o!r} is not model.FIELD=VALUE "
                              f"(fields: dim, n_layers, n_heads, n_kv_heads, ffn_dim, ...)")
        cur = getattr(cfg, key)
        try:
            if isinstance(cur, bool):
                kw[key] = val.lower() in ("1", "true", "yes")
            elif isinstance(cur, int):
                kw[key] = int(val)
            elif isinstance(cur, float):
                kw[key] = float(val)
            else:
                kw[key] = val
        except ValueError:
            raise ConfigError(f"moe init: override {o!r}: {val!r} is not a number") from None
    return dataclasses.replace(cfg, **kw).resolved() if kw else cfg
