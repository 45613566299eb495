"""Merge inputs opened for streaming: tensor names, shapes and one tensor at a time.

Weights are read with plain file reads from the safetensors layout (8-byte header length, JSON
header, raw data), not memory-mapped: pages of a mapped file that were touched stay in the
process's resident set until unmapped, so mapping every input would make peak RSS grow to the
size of all inputs. Here each `read` allocates exactly one tensor.

Two kinds of input directory:
    moe   this project's checkpoint (model.safetensors, config.json, meta.json with lineage)
    hf    a Hugging Face model directory (config.json + model.safetensors or sharded
          model-*.safetensors with model.safetensors.index.json); no lineage
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe.io.checkpoint import (
    CONFIG,
    WEIGHTS,
    CheckpointError,
    check_weights,
    is_checkpoint,
    read_config,
    read_meta,
    sha256_file,
)

HF_INDEX = "model.safetensors.index.json"

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def page_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in its own anonymous memory map, outside the malloc heap.

    glibc serves allocations below its (self-raising) mmap threshold from the heap, where tensors
    kept for the output interleave with freed temporaries and the freed space is never returned:
    over a 100M-parameter merge that fragmentation grew to ~0.7x the model. A mapping per tensor
    is returned to the OS the moment the tensor is freed.
    """
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


class TensorFile:
    """One safetensors file: header parsed at open, tensors read on demand."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self.entries: dict[str, dict[str, Any]] = header
        for name, e in header.items():
            if e.get("dtype") not in _DTYPES:
                raise CheckpointError(
                    f"{self.path}: tensor {name} has unsupported dtype {e.get('dtype')}"
                )

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self.entries[name]["dtype"]]

    def read(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        start, end = e["data_offsets"]
        shape, dtype = tuple(e["shape"]), _DTYPES[e["dtype"]]
        out = page_tensor(shape, dtype)
        if end == start:
            return out
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        if len(view) != end - start:
            raise CheckpointError(f"{self.path}: tensor {name} has inconsistent offsets")
        with open(self.path, "rb") as f:
            f.seek(self._data_start + start)
            if f.readinto(view) != len(view):
                raise CheckpointError(f"{self.path}: truncated while reading tensor {name}")
        return out


@dataclass
class Source:
    """One merge input."""

    path: Path
    kind: str  # "moe" | "hf"
    config: dict[str, Any]  # config.json as written
    meta: dict[str, Any] | None = None  # lineage (moe checkpoints only)
    files: dict[str, TensorFile] = field(default_factory=dict)  # tensor name -> its file

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[name].shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.files[name].dtype(name)

    def read(self, name: str) -> torch.Tensor:
        return self.files[name].read(name)


def resolve_input(path: str | os.PathLike) -> Path:
    """A checkpoint or HF directory, or a run directory holding the checkpoint at `model/`."""
    p = Path(path)
    if not is_checkpoint(p) and is_checkpoint(p / "model"):
        return p / "model"
    return p


def is_hf_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (
        p.is_dir()
        and (p / CONFIG).is_file()
        and not (p / "meta.json").exists()
        and ((p / WEIGHTS).is_file() or (p / HF_INDEX).is_file())
    )


def describe_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be a merge input, or None when it can."""
    p = resolve_input(path)
    if not p.exists():
        return f"no such checkpoint or model directory: {p}"
    if is_checkpoint(p) or is_hf_dir(p):
        return None
    if p.is_dir() and (p / CONFIG).is_file() and any(p.glob("*.bin")):
        return f"{p}: only safetensors weights can be read (pickled .bin files are never loaded)"
    return (
        f"{p} is neither a moe-forge checkpoint (model.safetensors, config.json, meta.json) nor "
        "a Hugging Face model directory (config.json + *.safetensors)"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return obj


def hf_weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> safetensors file of a Hugging Face directory (single file or sharded)."""
    if (path / HF_INDEX).is_file():
        weight_map = _read_json(path / HF_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{path / HF_INDEX}: no weight_map")
        return {name: path / fname for name, fname in weight_map.items()}
    tf = TensorFile(path / WEIGHTS)
    return {name: path / WEIGHTS for name in tf.entries}


def open_source(path: str | os.PathLike, verify: bool = True) -> Source:
    """Open a merge input without loading its weights (a moe checkpoint's sha256 is checked)."""
    problem = describe_problem(path)
    if problem:
        raise CheckpointError(problem)
    p = resolve_input(path)
    if is_checkpoint(p):
        meta = read_meta(p)
        if verify:
            want = (meta.get("sha256") or {}).get(WEIGHTS)
            if want is not None and sha256_file(p / WEIGHTS) != want:
                raise CheckpointError(
                    f"{p / WEIGHTS}: sha256 mismatch (file is corrupted or truncated)"
                )
        tf = TensorFile(p / WEIGHTS)
        check_weights({n: tf.shape(n) for n in tf.entries}, read_config(p), p / CONFIG)
        return Source(p, "moe", _read_json(p / CONFIG), meta, {n: tf for n in tf.entries})
    opened: dict[Path, TensorFile] = {}
    files: dict[str, TensorFile] = {}
    for name, fpath in hf_weight_files(p).items():
        if fpath not in opened:
            opened[fpath] = TensorFile(fpath)
        if name not in opened[fpath].entries:
            raise CheckpointError(f"{p}: index names tensor {name} but {fpath.name} lacks it")
        files[name] = opened[fpath]
    return Source(p, "hf", _read_json(p / CONFIG), None, files)
