"""`moe delta extract | compress | apply | info`: the operations on delta files.

Every check runs before anything is written, and files are written atomically, so bad input
leaves nothing on disk.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from moe.config import ConfigError, model_config_from_dict, to_dict
from moe.data.tokenizer import carried_tokenizer
from moe.delta.format import (
    Delta,
    compress_tensors,
    lossless_tensors,
    read_delta,
    stats,
    write_delta,
)
from moe.delta.registry import parse_spec
from moe.io.checkpoint import (
    WEIGHTS,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    make_meta,
    save_checkpoint,
)
from moe.io.output import claim

_FAMILY_HINT = "(pass --allow-cross-family to extract anyway)"


def _load(path: str | os.PathLike, what: str) -> Checkpoint:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what}: no such checkpoint: {p}")
    if not (p / "meta.json").is_file() and (p / "model" / "meta.json").is_file():
        p = p / "model"  # a run directory
    return load_checkpoint(p)


def base_info(base: Checkpoint) -> dict[str, Any]:
    return {"id": base.meta.get("id"), "base_id": base.meta.get("base_id"),
            "sha256": base.meta["sha256"][WEIGHTS], "family": base.meta.get("family"),
            "path": str(base.path)}  # fmt: skip


def check_pair(base: Checkpoint, ft: Checkpoint, allow_cross_family: bool = False) -> None:
    """The fine-tune descends from the base (lineage) and has its architecture and tensors."""
    if ft.meta.get("base_id") != base.meta.get("base_id"):
        raise ConfigError(
            f"lineage differs: {ft.path} descends from base {ft.meta.get('base_id')!r} but "
            f"{base.path} from {base.meta.get('base_id')!r}; a delta is taken against its own base")
    bf, ff = base.meta.get("family"), ft.meta.get("family")
    if not allow_cross_family and bf is not None and bf != ff:
        raise ConfigError(f"base {base.path} is of expert family {bf!r} but {ft.path} is "
                          f"{ff!r} {_FAMILY_HINT}")
    if to_dict(base.config.resolved()) != to_dict(ft.config.resolved()):
        raise ConfigError(f"architecture differs between {base.path} and {ft.path} "
                          "(config.json); a delta needs the same architecture")
    for n, t in ft.state_dict.items():
        if n not in base.state_dict:
            raise ConfigError(f"tensor {n} is in {ft.path} but not in {base.path}")
        if tuple(base.state_dict[n].shape) != tuple(t.shape):
            raise ConfigError(f"tensor {n} has shape {tuple(t.shape)} in {ft.path} but "
                              f"{tuple(base.state_dict[n].shape)} in {base.path}")
    missing = sorted(set(base.state_dict) - set(ft.state_dict))
    if missing:
        raise ConfigError(f"tensor {missing[0]} is in {base.path} but not in {ft.path}")


def extract_state(base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], bool]:  # fmt: skip
    """δ = θ_ft − θ_base in float64 per tensor, and whether base + δ rounds back to θ_ft."""
    deltas = {n: ft[n].double() - base[n].double() for n in ft}
    exact = all(torch.equal(apply_tensor(base[n], d), ft[n]) for n, d in deltas.items())
    return deltas, exact


def apply_tensor(base: torch.Tensor, delta: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """base + scale·δ computed in float64, rounded once to the base's dtype."""
    d = delta if scale == 1.0 else delta * scale
    return (base.double() + d).to(base.dtype)


def make_delta(base: Checkpoint, ft_meta: dict[str, Any], stored: dict, descs: dict,
               method: str, exact: bool | None, seed: int | None) -> Delta:  # fmt: skip
    meta = {
        "base": base_info(base),
        "finetune": {k: ft_meta.get(k) for k in ("id", "family", "domain", "kind", "tokens_seen",
                                                 "train_flops")},
        "method": method, "seed": seed, "exact": exact,
        "config": to_dict(base.config), "tensors": descs,
    }  # fmt: skip
    return Delta(meta, stored)


def extract(base_path: str | os.PathLike, ft_path: str | os.PathLike, out: str | os.PathLike,
            overwrite: bool = False, allow_cross_family: bool = False) -> dict[str, Any]:
    """Write the lossless delta FINETUNE − BASE; returns its `info`."""
    _refuse(out, overwrite)
    with claim(out, [base_path, ft_path]):  # moe/io/output.py
        return _extract(base_path, ft_path, out, overwrite, allow_cross_family)


def _extract(base_path, ft_path, out, overwrite: bool, allow_cross_family: bool
             ) -> dict[str, Any]:  # fmt: skip
    base, ft = _load(base_path, "base"), _load(ft_path, "fine-tune")
    check_pair(base, ft, allow_cross_family)
    deltas, exact = extract_state(base.state_dict, ft.state_dict)
    stored, descs = lossless_tensors(deltas)
    d = make_delta(base, ft.meta, stored, descs, "lossless", exact, None)
    n = write_delta(out, d, overwrite=overwrite)
    return stats(d, n)


def compress(src: str | os.PathLike, spec: str, out: str | os.PathLike, seed: int = 0,
             overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """Re-encode a delta file under a compression spec (e.g. topk:0.05+int8)."""
    parsed = parse_spec(spec)
    _refuse(out, overwrite)
    with claim(out, [src]):  # moe/io/output.py
        return _compress(src, parsed, out, seed, overwrite)


def _compress(src, parsed, out, seed: int, overwrite: bool) -> dict[str, Any]:
    d = read_delta(src)
    stored, descs = compress_tensors(d.dense_all(), parsed, seed=seed)
    prev = d.meta["method"]
    method = parsed.text if prev == "lossless" else f"{prev}>{parsed.text}"
    # every compressed encoding (float32 values included) loses the lossless delta's exactness
    meta = dict(d.meta, method=method, seed=seed, exact=False, tensors=descs)
    new = Delta(meta, stored)
    n = write_delta(out, new, overwrite=overwrite)
    return stats(new, n)


def apply_delta(base_path: str | os.PathLike, delta_path: str | os.PathLike,
                out: str | os.PathLike, overwrite: bool = False, scale: float = 1.0) -> Path:
    """base + δ → a checkpoint; refuses any base but the delta's own (weights sha256)."""
    if not math.isfinite(scale):
        raise ConfigError(f"--scale must be a finite number, got {scale}")
    _refuse(out, overwrite)
    with claim(out, [base_path, delta_path]):  # moe/io/output.py
        return _apply(base_path, delta_path, out, overwrite, scale)


def _apply(base_path, delta_path, out, overwrite: bool, scale: float) -> Path:
    d = read_delta(delta_path)
    base = _load(base_path, "base")
    want, got = d.meta["base"]["sha256"], base.meta["sha256"][WEIGHTS]
    if want != got:
        raise ConfigError(f"{delta_path} was taken against base {d.meta['base']['id']!r} "
                          f"(weights sha256 {want[:12]}...) but {base.path} has sha256 "
                          f"{got[:12]}...; apply a delta to its own base")
    if set(d.tensors) != set(base.state_dict):
        raise ConfigError(f"{delta_path} and {base.path} hold different tensors")
    state = {n: apply_tensor(base.state_dict[n], d.dense(n), scale) for n in base.state_dict}
    for n, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ConfigError(f"--scale {scale}: base + scale x delta overflows in {n} "
                              f"({t.dtype}); use a smaller scale")  # fmt: skip
    ft = d.meta["finetune"]
    meta = make_meta(
        parents=[x for x in (base.meta.get("id"), ft.get("id")) if x],
        base_id=base.meta.get("base_id"), family=ft.get("family"), domain=ft.get("domain"),
        kind="delta", tokens_seen=ft.get("tokens_seen") or 0,
        train_flops=ft.get("train_flops") or 0.0,
        recipe={"delta": str(delta_path), "method": d.meta["method"], "scale": scale},
        train_recipe=base.meta.get("recipe") if "data" in (base.meta.get("recipe") or {})
        else base.meta.get("train_recipe"),
    )  # fmt: skip
    cfg = model_config_from_dict(d.meta["config"])
    return save_checkpoint(out, state, cfg, meta, overwrite=overwrite,
                           tokenizer=carried_tokenizer(base.path, cfg.vocab_size))


def info(path: str | os.PathLike) -> dict[str, Any]:
    d = read_delta(path)
    return stats(d, os.path.getsize(path))


def _refuse(out: str | os.PathLike, overwrite: bool) -> None:
    if Path(out).exists() and not overwrite:
        raise CheckpointError(f"output {out} already exists (pass --overwrite to replace it)")
