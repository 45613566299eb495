"""Checkpoint directories: `model.safetensors`, `config.json` (model config), `meta.json` (lineage).

A checkpoint is written into a temporary sibling directory and renamed into place when complete,
so a kill at any moment leaves the old checkpoint or the new one, never a half-written one. The
meta records the sha256 of each weights file and loading verifies it. Nothing is ever unpickled.

meta.json fields:
    format        "moe-forge/1"
    id            short unique id of this checkpoint
    parents       ids of the checkpoints it was made from (training init, merge inputs, branches)
    base_id       id of the dense seed model the lineage started from (own id for a seed)
    family        expert family: which expert a fine-tune belongs to (e.g. "code"), or null
    domain        domain the checkpoint was trained on (null for mixed streams)
    kind          dense | moe | branch | merge | ...
    tokens_seen   training tokens over the whole lineage
    train_flops   training FLOPs over the whole lineage
    recipe        the resolved recipe (or merge config) that produced it
    tokenizer     {kind: byte | hf, sha256: content hash, ...}; an hf tokenizer's files are in
                  the checkpoint's tokenizer/ directory
    sha256        {filename: hex digest} of each weights file
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moe.config import ConfigError, ModelConfig, model_config_from_dict, to_dict

FORMAT = "moe-forge/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
META = "meta.json"


class CheckpointError(ConfigError):
    """A checkpoint is missing, truncated, corrupted or incompatible."""


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file through a temporary name + rename: readers see the old or the new text."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give a file name to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@dataclass
class Checkpoint:
    path: Path
    state_dict: dict[str, torch.Tensor]
    config: ModelConfig
    meta: dict[str, Any] = field(default_factory=dict)


def make_meta(**kw: Any) -> dict[str, Any]:
    """A meta dict with every field present (defaults for those not given)."""
    meta = dict(
        format=FORMAT,
        id=new_id(),
        parents=[],
        base_id=None,
        family=None,
        domain=None,
        kind="dense",
        tokens_seen=0,
        train_flops=0.0,
        recipe=None,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    meta.update(kw)
    if meta["base_id"] is None:
        meta["base_id"] = meta["id"]
    return meta


def save_checkpoint(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    config: ModelConfig | dict,
    meta: dict[str, Any],
    overwrite: bool = False,
    tokenizer: Any = None,
) -> Path:
    """Write a checkpoint directory atomically. Refuses an existing one unless `overwrite`.

    `tokenizer` (a tokenizer object, or a directory of tokenizer files carried from another
    checkpoint) is written into `tokenizer/` (none for the byte tokenizer) and recorded in
    meta.json as `tokenizer` (kind and content hash); None records nothing."""
    path = Path(path)
    recover(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"checkpoint {path} already exists (pass --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{new_id()}")
    tmp.mkdir()
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        cfg = config if isinstance(config, dict) else to_dict(config)
        meta = dict(meta)
        if tokenizer is not None:
            from moe.data.tokenizer import write_tokenizer

            meta["tokenizer"] = write_tokenizer(tokenizer, tmp)
        meta["sha256"] = {WEIGHTS: sha256_file(tmp / WEIGHTS)}
        for name, obj in ((CONFIG, cfg), (META, meta)):
            with open(tmp / name, "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, default=str)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
        with open(tmp / WEIGHTS, "rb") as f:
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    _check_dir(path)
    try:
        with open(path / META, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path / META}: corrupted JSON ({e.msg if hasattr(e, 'msg') else e})"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path / META}: not a moe-forge checkpoint meta (format != {FORMAT})"
        )
    return meta


def read_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    _check_dir(path)
    try:
        with open(path / CONFIG, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG}: corrupted JSON ({e})") from None
    try:
        return model_config_from_dict(d)
    except ConfigError as e:
        raise CheckpointError(f"{path / CONFIG}: {str(e).removeprefix('config.json: ')}") from None


def replace_dir(tmp: Path, path: Path) -> None:
    """Move a fully written directory `tmp` to `path`, replacing what is there.

    A directory cannot be renamed over a non-empty one, so an existing `path` is first moved
    aside to `.NAME.old-PID`; a kill between the two renames leaves that complete old version,
    which `recover` puts back.
    """
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def recover(path: str | os.PathLike) -> None:
    """Finish an overwrite that a kill interrupted between its two renames.

    `save_checkpoint` moves the old checkpoint aside to `.NAME.old-PID`, renames the complete new
    one into place, then deletes the old one. Killed in between, the old version (complete) is
    put back; killed after, the leftover is removed. Temporary directories of killed writes are
    removed too. Either way `path` then holds a complete checkpoint, old or new, or nothing.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return
    olds = sorted(path.parent.glob(f".{path.name}.old-*"))
    for i, old in enumerate(olds):
        if not path.exists() and i == len(olds) - 1:
            os.replace(old, path)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_dir(path: Path) -> None:
    recover(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: a checkpoint is a directory holding {WEIGHTS}, {CONFIG}, {META}"
        )
    for name in (WEIGHTS, CONFIG, META):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: incomplete checkpoint, {name} is missing")


def load_state_dict(path: str | os.PathLike, verify: bool = True) -> dict[str, torch.Tensor]:
    path = Path(path)
    meta = read_meta(path)
    if verify:
        want = (meta.get("sha256") or {}).get(WEIGHTS)
        if want is None:
            raise CheckpointError(f"{path / META}: no sha256 recorded for {WEIGHTS}")
        got = sha256_file(path / WEIGHTS)
        if got != want:
            raise CheckpointError(
                f"{path / WEIGHTS}: sha256 mismatch (file is corrupted or truncated; "
                f"expected {want[:12]}..., got {got[:12]}...)"
            )
    try:
        return load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path / WEIGHTS}: cannot read weights ({str(e).splitlines()[0]})"
        ) from None


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> Checkpoint:
    """Load a checkpoint directory (weights verified against meta.json's sha256)."""
    path = Path(path)
    meta = read_meta(path)
    config = read_config(path)
    return Checkpoint(path=path, state_dict=load_state_dict(path, verify), config=config, meta=meta)


def is_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / META).is_file() and (p / WEIGHTS).is_file()
