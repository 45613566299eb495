"""The delta file: a fine-tune's parameter update, compressed or not, as one safetensors file.

    moe delta extract BASE FINETUNE -o ft.delta.safetensors   # lossless δ = θ_ft − θ_base
    moe delta compress ft.delta.safetensors topk:0.05+int8 -o small.delta.safetensors
    moe delta apply BASE small.delta.safetensors -o runs/applied  # base + δ̂ → a checkpoint
    moe delta info small.delta.safetensors                        # bytes, sparsity, rank

Layout: the stored tensors of each model tensor NAME are `NAME:COMPONENT` entries (see `encode`):
    dense    NAME:v.*                      the delta's values, numel of them
    sparse   NAME:idx (int16/int32 flat positions) or NAME:mask (packed bits), and NAME:v.*
    lowrank  NAME:A.* and NAME:B.*         δ ≈ A @ B
where `.*` is the values encoding: `.f64`, `.f32`, `.f16`, `.q`+`.scale` (int8),
`.q4`+`.scale` (int4, two per byte), `.sign`+`.scale` (BitDelta). The safetensors metadata
holds `format` = moe-forge-delta/1 and `delta`, a JSON object: the base's id, lineage base id
and weights sha256 (apply refuses any other base), the fine-tune's id, family, domain and
training counts, the compression spec, the model config, and each tensor's layout.

The size of a delta is its file's size in bytes (header included): `info` reports exactly that.
The lossless delta keeps float64 values: the difference of two float32 numbers is exact in
float64 (unless their exponents are 29+ apart), so base + δ rounds back to the fine-tune bit for
bit; extract verifies it and records `exact`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from moe.config import ConfigError
from moe.delta.bitdelta import pack_bits, unpack_bits
from moe.delta.primitives import tensor_generator
from moe.delta.registry import Coded, Spec, parse_spec

FORMAT = "moe-forge-delta/1"
SUFFIX = ".delta.safetensors"


@dataclass
class Delta:
    """A delta in memory: its JSON metadata and the stored tensors (`NAME:COMPONENT` keys)."""

    meta: dict[str, Any]
    stored: dict[str, torch.Tensor]

    @property
    def tensors(self) -> dict[str, dict]:
        return self.meta["tensors"]

    def dense(self, name: str) -> torch.Tensor:
        """The delta of model tensor `name`, decoded to a dense float64 tensor of its shape."""
        return decode(name, self.tensors[name], self.stored)

    def dense_all(self) -> dict[str, torch.Tensor]:
        return {n: self.dense(n) for n in self.tensors}


# ----------------------------------------------------------------------------- values encoding


def encode_values(key: str, x: torch.Tensor, values) -> tuple[dict[str, torch.Tensor], str]:
    """Encode one float array under `key` with a values step (None: float32; "f64": lossless)."""
    x = x.reshape(-1)
    if values == "f64":
        return {f"{key}.f64": x.double().contiguous()}, "f64"
    if values is None:
        return {f"{key}.f32": x.float().contiguous()}, "f32"
    return {f"{key}.{s}": t.contiguous() for s, t in values.fn(x).items()}, values.name


def decode_values(key: str, enc: str, numel: int, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    if enc in ("f64", "f32"):
        return stored[f"{key}.{enc}"].double()
    from moe.delta.registry import steps

    step = steps()[enc]
    comps = {k[len(key) + 1:]: v for k, v in stored.items() if k.startswith(f"{key}.")}
    return step.decode(comps, numel)


# ----------------------------------------------------------------------------- tensor layouts


def encode(name: str, coded: Coded, values) -> tuple[dict[str, torch.Tensor], dict]:
    """One tensor's stored entries and its layout description."""
    numel = 1
    for s in coded.shape:
        numel *= s
    desc: dict[str, Any] = {"layout": coded.layout, "shape": list(coded.shape)}
    out: dict[str, torch.Tensor] = {}
    if coded.layout == "sparse":
        k = int(coded.idx.numel())
        desc["k"] = k
        # the cheaper of explicit positions and a bitmask over all entries
        pos_dtype = torch.int16 if numel <= 32767 else torch.int32
        pos_bytes = k * (2 if pos_dtype == torch.int16 else 4)
        if pos_bytes <= (numel + 7) // 8:
            out[f"{name}:idx"] = coded.idx.to(pos_dtype)
        else:
            mask = torch.zeros(numel, dtype=torch.bool)
            mask[coded.idx] = True
            out[f"{name}:mask"] = pack_bits(mask)
    for comp, arr in coded.arrays.items():
        enc, kind = encode_values(f"{name}:{comp}", arr, values)
        out.update(enc)
        desc[f"{comp}_shape"] = list(arr.shape)
        desc["values"] = kind
    desc.update({k: v for k, v in coded.params.items() if v is not None})
    return out, desc


def decode(name: str, desc: dict, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    shape = tuple(desc["shape"])
    numel = 1
    for s in shape:
        numel *= s
    enc = desc["values"]
    if desc["layout"] == "dense":
        return decode_values(f"{name}:v", enc, numel, stored).reshape(shape)
    if desc["layout"] == "sparse":
        k = desc["k"]
        if f"{name}:idx" in stored:
            idx = stored[f"{name}:idx"].long()
        else:
            idx = unpack_bits(stored[f"{name}:mask"], numel).nonzero().reshape(-1)
        out = torch.zeros(numel, dtype=torch.float64)
        out[idx] = decode_values(f"{name}:v", enc, k, stored)
        return out.reshape(shape)
    if desc["layout"] == "lowrank":
        a_shape, b_shape = tuple(desc["A_shape"]), tuple(desc["B_shape"])
        A = decode_values(f"{name}:A", enc, a_shape[0] * a_shape[1], stored).reshape(a_shape)
        B = decode_values(f"{name}:B", enc, b_shape[0] * b_shape[1], stored).reshape(b_shape)
        return (A @ B).reshape(shape)  # (m, r) @ (r, n)
    raise ConfigError(f"delta tensor {name}: unknown layout {desc['layout']!r}")


# ----------------------------------------------------------------------------- compression


def check_spec(spec: Spec, shapes: dict[str, tuple[int, ...]]) -> None:
    """Errors a spec would raise on these tensors, before any work (rank vs each 2-D shape)."""
    if spec.structure is not None and spec.structure[0].name == "lowrank":
        r = spec.structure[1]
        for n, s in shapes.items():
            if len(s) == 2 and r > min(s):
                raise ConfigError(f"compression {spec.text!r}: rank {r} is larger than tensor {n} "
                                  f"of shape {tuple(s)} allows (at most {min(s)})")


def compress_tensors(deltas: dict[str, torch.Tensor], spec: Spec | str, seed: int = 0
                     ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:  # fmt: skip
    """Dense float deltas -> (stored entries, per-tensor layouts) under a compression spec."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    check_spec(spec, {n: tuple(d.shape) for n, d in deltas.items()})
    stored: dict[str, torch.Tensor] = {}
    descs: dict[str, dict] = {}
    for name, d in deltas.items():
        d = d.double()
        if spec.structure is None:
            coded = Coded("dense", tuple(d.shape), {"v": d.reshape(-1)})
        else:
            step, arg = spec.structure
            coded = step.fn(d, arg, tensor_generator(seed, name))
        enc, desc = encode(name, coded, spec.values)
        stored.update(enc)
        descs[name] = desc
    return stored, descs


def lossless_tensors(deltas: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    stored, descs = {}, {}
    for name, d in deltas.items():
        enc, desc = encode(name, Coded("dense", tuple(d.shape), {"v": d.reshape(-1)}), "f64")
        stored.update(enc)
        descs[name] = desc
    return stored, descs


# ----------------------------------------------------------------------------- file I/O


def to_bytes(delta: Delta) -> bytes:
    """The file's exact content (what `write_delta` writes; its length is the delta's size)."""
    return save(dict(sorted(delta.stored.items())),
                metadata={"format": FORMAT, "delta": json.dumps(delta.meta, sort_keys=True)})


def write_delta(path: str | os.PathLike, delta: Delta, overwrite: bool = False) -> int:
    """Write atomically (temporary name + rename); returns the file's size in bytes."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; a delta is one file (NAME{SUFFIX})")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists (pass --overwrite to replace it)")
    data = to_bytes(delta)
    from moe.io.checkpoint import staged_file

    with staged_file(path) as tmp:
        tmp.write_bytes(data)
    return len(data)


def is_delta(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    try:
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100_000_000:
                return False
            head = json.loads(f.read(n))
    except (OSError, ValueError):
        return False
    return (head.get("__metadata__") or {}).get("format") == FORMAT


def read_delta(path: str | os.PathLike) -> Delta:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"no such delta file: {p}")
    if not is_delta(p):
        raise ConfigError(f"{p} is not a moe-forge delta file (make one with moe delta extract)")
    data = p.read_bytes()
    try:
        stored = load(data)
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8:8 + n])["__metadata__"]["delta"])
    except (SafetensorError, ValueError, KeyError) as e:
        raise ConfigError(f"{p}: corrupted delta file ({str(e).splitlines()[0]})") from None
    return Delta(meta, stored)


def stats(delta: Delta, nbytes: int) -> dict[str, Any]:
    """What `moe delta info` prints: exact bytes, parameters, stored nonzeros, ranks."""
    params = nonzero = 0
    ranks: dict[str, int] = {}
    for name, desc in delta.tensors.items():
        d = delta.dense(name)
        params += d.numel()
        nonzero += int((d != 0).sum())
        if desc["layout"] == "lowrank":
            ranks[name] = desc["rank"]
    payload = sum(t.numel() * t.element_size() for t in delta.stored.values())
    m = delta.meta
    return {
        "bytes": nbytes, "payload_bytes": payload, "header_bytes": nbytes - payload,
        "parameters": params, "bytes_per_parameter": nbytes / max(params, 1),
        "density": nonzero / max(params, 1), "sparsity": 1 - nonzero / max(params, 1),
        "method": m["method"], "exact": m.get("exact"),
        "lowrank_ranks": sorted(set(ranks.values())), "lowrank_tensors": len(ranks),
        "base_id": m["base"]["id"], "base_sha256": m["base"]["sha256"],
        "finetune_id": m["finetune"].get("id"), "family": m["finetune"].get("family"),
        "domain": m["finetune"].get("domain"),
    }  # fmt: skip
