"""Delta files as merge inputs: `moe merge` of a family's fine-tunes from their deltas alone.

A `models:` entry of a merge config may name a delta file (`moe delta extract`/`compress`)
instead of a checkpoint. It is read as the fine-tune it stands for, base + δ̂ (the decoded,
possibly compressed delta), one tensor at a time, so every merge method (task arithmetic,
TIES, DARE, linear, slerp) takes deltas as it takes checkpoints. The config must name the
delta's own base as `base_model` (its weights' sha256 is checked); the delta's lineage (base
id, family) enters the usual family check, so deltas of different families merge only with
`allow_cross_family: true`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moe.config import ConfigError
from moe.delta.format import Delta, is_delta, read_delta
from moe.io.sources import Source, describe_problem, open_source


class DeltaSource(Source):
    """A fine-tune reconstructed as base + δ̂; names, shapes and dtypes are the base's."""

    def __init__(self, path: Path, base: Source, delta: Delta):
        ft = delta.meta["finetune"]
        meta = {"id": ft.get("id"), "base_id": delta.meta["base"].get("base_id"),
                "family": ft.get("family"), "domain": ft.get("domain"), "kind": ft.get("kind"),
                "tokens_seen": ft.get("tokens_seen") or 0,
                "train_flops": ft.get("train_flops") or 0.0}  # fmt: skip
        super().__init__(path, base.kind, base.config, meta, base.files)
        self.base = base
        self.delta = delta
        self.tokenizer_dir = base.path  # a delta carries no tokenizer: its base's applies

    def read(self, name: str) -> torch.Tensor:
        t = self.base.read(name)
        return (t.double() + self.delta.dense(name)).to(t.dtype)


def input_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be a merge input, or None when it can: a checkpoint, a Hugging Face
    directory (`describe_problem`) or a fine-tune's delta file over base_model."""
    if is_delta(path):
        return None
    return describe_problem(path)


def open_model(path: str | os.PathLike, base: Source | None) -> Source:
    """A merge input: a checkpoint (as `open_source`) or a delta file over `base`."""
    if not is_delta(path):
        return open_source(path)
    d = read_delta(path)
    if base is not None and base.meta is None:
        raise ConfigError(f"models: {path} is a delta, whose base is a moe-forge checkpoint; "
                          f"base_model {base.path} is a Hugging Face directory")
    if base is None:
        raise ConfigError(f"models: {path} is a delta; set base_model: to its base checkpoint "
                          f"({d.meta['base'].get('path')}, id {d.meta['base'].get('id')!r})")
    want = d.meta["base"]["sha256"]
    got = (base.meta.get("sha256") or {}).get("model.safetensors")
    if want != got:
        raise ConfigError(f"models: {path} was taken against base {d.meta['base'].get('id')!r} "
                          f"(weights sha256 {want[:12]}...) but base_model {base.path} has "
                          f"{(got or '?')[:12]}...; a delta merges over its own base")
    if set(d.tensors) != set(base.names):
        raise ConfigError(f"models: {path} and base_model {base.path} hold different tensors")
    return DeltaSource(Path(path), base, d)
