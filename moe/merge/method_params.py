"""Method-specific merge parameters (mergekit's names): read from a MergeConfig, checked at load.

Each method declares its own parameters as `registry.Param`s (gamma, epsilon, select_topk,
filter_wise, nuslerp_flatten, ...). The config has one optional field per name (unset = None):
`parameters:` holds every one, `models[i].parameters` (and slice sources') the per-model ones.
A value given for a method that does not take it is refused, naming the methods that do.

    resolve(c, name, p, entries)   the values for tensor `name` at gradient position `p`:
                                   per-model ones as a list in `entries` order (models or a
                                   slice's merged sources), the others as one value
    check(c, spec, bad)            load-time: ranges, model counts, weights, the method's hook
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import Any

from moe.config import ConfigError
from moe.merge import registry
from moe.merge.gradients import check_form, value_at
from moe.merge.registry import MethodSpec, Param

# the config fields that take gradient / filter forms (the float parameters); every other
# method-specific field is one bool, int or float
FORM_KEYS = ("gamma", "epsilon", "select_topk")
PER_MODEL_KEYS = ("gamma", "epsilon")


def _declared() -> dict[str, list[tuple[str, Param]]]:
    """parameter name -> [(method, Param)] over every registered method."""
    out: dict[str, list[tuple[str, Param]]] = {}
    for name, spec in registry.METHODS.items():
        for prm in spec.params:
            out.setdefault(prm.name, []).append((name, prm))
    return out


def resolve(c: Any, name: str, p: float, entries: list[Any]) -> MappingProxyType:
    """The method-specific values of config `c` for tensor `name` at gradient position `p`."""
    spec = registry.get(c.merge_method)
    out: dict[str, Any] = {}
    for prm in spec.params:
        glob = getattr(c.parameters, prm.name)
        if isinstance(prm.default, (bool, int)):
            out[prm.name] = prm.default if glob is None else glob
            continue
        g = value_at(glob, name, p, float(prm.default))
        if prm.per_model:
            out[prm.name] = [
                g if (v := value_at(getattr(e, prm.name), name, p)) is None else v
                for e in entries
            ]
        else:
            out[prm.name] = g
    return MappingProxyType(out)


def _entries(c: Any) -> list[tuple[str, Any]]:
    """(config path, per-model parameters) of every model and slice source."""
    return [(f"models[{i}]", m.parameters) for i, m in enumerate(c.models)] + [
        (f"slices[{i}].sources[{k}]", s.parameters)
        for i, sl in enumerate(c.slices) for k, s in enumerate(sl.sources)]  # fmt: skip


def _is_set(v: Any) -> bool:
    return v is not None


def check(c: Any, spec: MethodSpec, bad: Callable[[str], Exception]) -> None:
    """Load-time checks of the method-specific parameters and of what the method accepts."""
    declared = _declared()
    own = {prm.name: prm for prm in spec.params}
    for key, users in sorted(declared.items()):
        who = ", ".join(sorted({m for m, _ in users}))
        places = [(f"parameters.{key}", getattr(c.parameters, key))]
        if key in PER_MODEL_KEYS:
            places += [(f"{w}.parameters.{key}", getattr(e, key)) for w, e in _entries(c)]
        for where, v in places:
            if not _is_set(v):
                continue
            if key not in own:
                raise bad(f"{where}: {c.merge_method} does not take {key} (taken by {who})")
            prm = own[key]
            if isinstance(prm.default, bool):
                continue  # the schema checked the type
            try:
                check_form(v, where, prm.ok, prm.rule)
            except ConfigError as e:
                raise bad(str(e)) from None
    if not spec.uses_weight:
        given = [(f"{w}.parameters.weight", e.weight) for w, e in _entries(c)
                 if e.weight is not None]  # fmt: skip
        if c.parameters.weight != 1.0:
            given.insert(0, ("parameters.weight", c.parameters.weight))
        if given:
            raise bad(f"{given[0][0]}: {c.merge_method} does not use weight (it computes its "
                      "own coefficients)")
    lo, hi = spec.n_models
    for where, n in _counts(c, spec) if spec.n_models != (1, None) else []:
        if n < lo or (hi is not None and n > hi):
            want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else \
                f"{lo} to {hi}"
            noun = "model" if want.endswith(" 1") else "models"
            base = " besides base_model" if spec.needs_base else ""
            raise bad(f"{where}: {c.merge_method} merges {want} {noun}{base}, got {n}")
    if spec.check is not None:
        spec.check(c, bad)


def _counts(c: Any, spec: MethodSpec) -> list[tuple[str, int]]:
    """(config path, number of merged models) for `models:` or each slice (base excluded)."""
    if not c.slices:
        return [("models", len(c.models))]
    from pathlib import Path

    out = []
    for i, sl in enumerate(c.slices):
        n = len(sl.sources)
        if spec.needs_base and c.base_model is not None:
            base = Path(c.base_model).resolve()
            n -= sum(1 for s in sl.sources if Path(s.model).resolve() == base)
        out.append((f"slices[{i}].sources", n))
    return out


def scalar_pairs(c: Any, key_a: str, key_b: str) -> list[tuple[str, float, float]]:
    """(config path of b, a, b) per model where both parameters resolve to plain numbers (a
    model's own value, else the global one; `a` defaults to 1, `b` to its Param default)."""
    spec = registry.get(c.merge_method)
    dflt = {prm.name: prm.default for prm in spec.params}
    out = []
    for where, e in _entries(c):
        va, vb = getattr(e, key_a, None), getattr(e, key_b, None)
        path = f"{where}.parameters.{key_b}" if vb is not None else f"parameters.{key_b}"
        va = getattr(c.parameters, key_a) if va is None else va
        vb = getattr(c.parameters, key_b) if vb is None else vb
        va = 1.0 if va is None else va
        vb = dflt.get(key_b, 0.0) if vb is None else vb
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
            out.append((path, float(va), float(vb)))
    return out

