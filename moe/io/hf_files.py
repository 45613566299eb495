"""Hugging Face conventions of an exported directory, beside config.json and the weights:

- sharded safetensors: above `max_shard_size` bytes the weights go into
  `model-00001-of-0000N.safetensors`, ... with `model.safetensors.index.json` ({"metadata":
  {"total_size": bytes}, "weight_map": {tensor: file}}), as transformers writes them; at or below
  it, one `model.safetensors`. Shards are filled greedily in tensor order; a tensor larger than
  the limit gets a shard of its own (tensors are never split).
- `README.md`, a model card: YAML front matter (base_model, library_name, tags, pipeline_tag and
  a `moe_forge` mapping with the checkpoint's id, kind, parents, the merge or assembly config it
  came from and the study row: the meta's, else the row of the `moe run` results.json above the
  checkpoint that names it), then a short description with that config as a YAML block.
- `generation_config.json`: the BOS/EOS/PAD token ids (written by moe/io/hf_export.py).

Sizes are given like transformers' `max_shard_size`: an int (bytes) or a string with a unit,
KB/MB/GB (powers of 1000) or KiB/MiB/GiB (powers of 1024); default "5GB".
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from moe.config import ConfigError, ModelConfig
from moe.io.sources import HF_INDEX

DEFAULT_MAX_SHARD_SIZE = "5GB"
_UNITS = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip


def parse_size(size: int | str, field: str = "--max-shard-size") -> int:
    """Bytes of a size given as an int or as e.g. "5GB", "200MB", "64KiB" (see the module doc)."""
    if isinstance(size, bool):
        raise ConfigError(f"{field}: expected a size such as 5GB or 200MB, got {size!r}")
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise ConfigError(f"{field}: expected a size such as 5GB or 200MB, got {size!r}")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n < 1:
        raise ConfigError(f"{field}: must be at least 1 byte, got {size!r}")
    return n


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def save_weights(tensors: dict[str, torch.Tensor], out: Path,
                 max_shard_size: int | str) -> list[str]:
    """Write `tensors` into `out` as one model.safetensors, or as shards + index when they hold
    more than `max_shard_size` bytes. Returns the file names written."""
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, t in tensors.items():
        if shards[-1] and used + _nbytes(t) > limit:
            shards.append({})
            used = 0
        shards[-1][name] = t
        used += _nbytes(t)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
             "weight_map": weight_map}  # fmt: skip
    (out / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, HF_INDEX]


# ----------------------------------------------------------------------------- model card


def _source_config(meta: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """("merge" | "assembly", the config) the checkpoint was made from, else (None, None)."""
    if meta.get("kind") == "merge" and isinstance(meta.get("recipe"), dict):
        return "merge", meta["recipe"]
    assembled = meta.get("assembled")
    if isinstance(assembled, dict):
        return "assembly", assembled.get("config") or assembled
    return None, None


def base_models(meta: dict[str, Any]) -> list[str]:
    """The models a checkpoint was made from, as the card's `base_model` names them: a merge's
    base_model and models, an assembly config's base_model and experts' source models, else the
    Hugging Face directory it was imported from."""
    kind, cfg = _source_config(meta)
    names: list[Any] = []
    if kind == "merge" and cfg is not None:
        names = [cfg.get("base_model")] + [m.get("model") for m in cfg.get("models") or []]
    elif kind == "assembly" and cfg is not None:
        names = [cfg.get("base_model")] + [
            e.get("source_model")
            for e in (cfg.get("experts") or []) + (cfg.get("shared_experts") or [])
            if isinstance(e, dict)
        ]
    elif meta.get("hf_source"):
        names = [meta["hf_source"]]
    out: list[str] = []
    for n in names:
        if n and str(n) not in out:
            out.append(str(n))
    return out


def model_card(cfg: ModelConfig, meta: dict[str, Any], architecture: str) -> str:
    """README.md: YAML front matter (parsed by the Hub) and a short description."""
    kind, source_cfg = _source_config(meta)
    tags = ["moe-forge"]
    if cfg.moe.experts:
        tags.append("moe")
    if kind is not None:
        tags.append("merge")
    tags.append(architecture.removesuffix("ForCausalLM").lower())
    front: dict[str, Any] = {}
    bases = base_models(meta)
    if bases:
        front["base_model"] = bases[0] if len(bases) == 1 else bases
    front.update(library_name="transformers", tags=tags, pipeline_tag="text-generation")
    ours: dict[str, Any] = {"id": meta.get("id"), "kind": meta.get("kind"),
                            "parents": list(meta.get("parents") or [])}  # fmt: skip
    if kind is not None:
        ours[f"{kind}_config"] = source_cfg
    if meta.get("study") is not None:
        ours["study"] = meta["study"]
    front["moe_forge"] = ours
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    lines.append(f"# {architecture} exported by moe-forge")
    lines.append("")
    m = cfg.moe
    if m.experts:
        shared = (f", plus a shared expert of {m.shared_expert_ffn_dim} neurons"
                  if m.shared_expert_ffn_dim else "")  # fmt: skip
        lines.append(f"A mixture of {len(m.experts)} experts ({', '.join(m.experts)}), "
                     f"{m.top_k} per token{shared}; {cfg.n_layers} layers, width {cfg.dim}.")
    else:
        lines.append(f"A dense model: {cfg.n_layers} layers, width {cfg.dim}.")
    lines.append("")
    lines.append(f"moe-forge checkpoint `{meta.get('id')}` (kind `{meta.get('kind')}`).")
    if kind is not None:
        title = "Merge" if kind == "merge" else "Assembly"
        lines += ["", f"## {title} configuration", "", "```yaml",
                  yaml.safe_dump(source_cfg, sort_keys=False).rstrip(), "```"]  # fmt: skip
    if meta.get("study") is not None:
        lines += ["", "## Study row", "", "```yaml",
                  yaml.safe_dump(meta["study"], sort_keys=False).rstrip(), "```"]  # fmt: skip
    return "\n".join(lines) + "\n"


def study_row(model_dir: Path, levels: int = 4) -> dict[str, Any] | None:
    """The study row a checkpoint came from: a `results.json` of `moe run` found in the
    checkpoint's run directory or up to `levels` folders above it, whose `models` entry points at
    this checkpoint. Returns its study, seed, model, arm, training FLOPs and held-out bits per
    byte per domain, or None when the checkpoint is not a study stage."""
    model_dir = Path(model_dir).resolve()
    for root in list(model_dir.parents)[:levels]:
        f = root / "results.json"
        if not f.is_file():
            continue
        try:
            res = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        models = res.get("models") if isinstance(res, dict) else None
        for name, m in (models or {}).items():
            ck = isinstance(m, dict) and m.get("checkpoint")
            if not isinstance(ck, str) or (root / ck).resolve() not in (model_dir,
                                                                       model_dir.parent):
                continue
            bpb = {d: e["bpb"] for d, e in (m.get("eval") or {}).items()
                   if isinstance(e, dict) and isinstance(e.get("bpb"), (int, float))}
            return {"study": res.get("name"), "seed": res.get("seed"), "model": name,
                    "arm": m.get("label") or m.get("arm"), "train_flops": m.get("train_flops"),
                    "bpb": bpb}
    return None


def read_card(path: Path) -> dict[str, Any]:
    """The front matter of a README.md model card, parsed."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        raise ConfigError(f"{path}: no YAML front matter")
    front, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(front) or {}


__all__ = ["DEFAULT_MAX_SHARD_SIZE", "base_models", "model_card", "parse_size", "read_card",
           "save_weights"]
