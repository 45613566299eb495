"""mergekit's forms of a merge parameter (`t`, `weight`, `density`), resolved per tensor.

    t: 0.5                              # a number: every tensor
    t: [0, 0.5, 1]                      # a gradient over the layers
    t:                                  # per tensor name, first match wins
      - filter: self_attn               #   a substring of the tensor's name, ours
        value: [0, 0.5, 0.3, 0.7, 1]    #   (layers.3.attn.wq.weight) or Hugging Face's
      - filter: mlp                     #   (model.layers.3.self_attn.q_proj.weight)
        value: [1, 0.5, 0.7, 0.3, 0]
      - value: 0.5                      #   no filter: every other tensor

A gradient's values are anchors spread evenly over positions 0..1, linearly interpolated: the
layers of the merged range sit at positions j / (n - 1) (n layers; one layer sits at 0); the
tensors before the layers (the embedding) at 0, after them (final norm, output head) at 1. In a
`slices:` merge the range is the slice. A name no filter matches takes the parameter's default.
"""

from __future__ import annotations

import re
from typing import Any

from moe.config import ConfigError

_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")  # ours, or a Hugging Face directory's
_AFTER_LAYERS = ("norm.", "lm_head.", "model.norm.")  # the tensors after the layers


def position(name: str, first: int, n: int) -> float:
    """Where tensor `name` sits on the 0..1 axis of a gradient over layers first..first+n-1."""
    m = _LAYER.match(name)
    if m is None:
        return 1.0 if name.startswith(_AFTER_LAYERS) else 0.0
    return (int(m.group(1)) - first) / (n - 1) if n > 1 else 0.0


def _interp(values: list[float], p: float) -> float:
    if len(values) == 1:
        return float(values[0])
    x = min(max(p, 0.0), 1.0) * (len(values) - 1)
    i = min(int(x), len(values) - 2)
    return float(values[i] + (x - i) * (values[i + 1] - values[i]))


def _matches(filt: str, name: str) -> bool:
    from moe.io.hf import hf_name

    if filt in name:
        return True
    try:  # a config written for mergekit filters Hugging Face names (self_attn, mlp, ...)
        return filt in hf_name(name)
    except ConfigError:  # MoE tensors: no Llama name
        return False


def value_at(v: Any, name: str, p: float, default: float | None = None) -> float | None:
    """The value of parameter form `v` for tensor `name` at gradient position `p`."""
    if v is None:
        return default
    if isinstance(v, (int, float)):
        return float(v)
    if v and all(isinstance(x, (int, float)) for x in v):
        return _interp([float(x) for x in v], p)
    for entry in v:  # filters, first match
        f = entry.get("filter")
        if f is None or _matches(str(f), name):
            return value_at(entry["value"], name, p, default)
    return default


def check_form(v: Any, where: str, ok, rule: str) -> None:
    """A parameter form is well made and every number in it satisfies `ok` (`rule` says how)."""
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float, list, tuple)):
        raise ConfigError(f"{where}: a number, a list of numbers (a gradient over the layers) or "
                          f"a list of {{filter, value}} entries, got {v!r}")
    if isinstance(v, (int, float)):
        if not ok(float(v)):
            raise ConfigError(f"{where} must be {rule}, got {v}")
        return
    if not v:
        raise ConfigError(f"{where}: an empty list")
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        for x in v:
            check_form(x, where, ok, rule)
        return
    for i, e in enumerate(v):
        if not isinstance(e, dict) or "value" not in e or set(e) - {"filter", "value"}:
            raise ConfigError(f"{where}[{i}]: a gradient lists numbers only; a filtered entry "
                              "is {filter: NAME_PART, value: ...} (filter optional)")
        if e.get("filter") is not None and not isinstance(e["filter"], str):
            raise ConfigError(f"{where}[{i}].filter must be a string, got {e['filter']!r}")
        if isinstance(e["value"], list) and any(isinstance(x, dict) for x in e["value"]):
            raise ConfigError(f"{where}[{i}].value: filters do not nest")
        check_form(e["value"], f"{where}[{i}].value", ok, rule)


def coerce(v: Any) -> Any:
    """Numbers written as text (an override's `t=0.3`, YAML's `.nan`) as floats: a field that
    takes any form is not converted by the schema, and NaN/inf must reach the finite check."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    if isinstance(v, (list, tuple)):
        return [coerce(x) for x in v]
    if isinstance(v, dict):
        return {k: coerce(x) if k == "value" else x for k, x in v.items()}
    return v


def is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (int, float))
