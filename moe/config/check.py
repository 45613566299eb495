"""Checks that hold for any schema of dataclasses (recipes, merge configs): the one-line
`ConfigError`, omegaconf's failures explained with the key and a suggestion, the shape of every
section, list and mapping of a raw YAML layer before it is merged, and finite numbers.
`moe.config` re-exports them; moe/merge/config.py applies them to merge configs.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A user's recipe or argument is wrong. Its message is one line, shown without a traceback."""


# ----------------------------------------------------------------------------- omegaconf's errors


def _all_keys(schema: type, prefix: str = "") -> list[str]:
    out = []
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        out.append(key)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            out.extend(_all_keys(type(default), key + "."))
    return out


# names other frameworks (transformers, Lightning) give our keys: suggested before spelling
ALIASES = {"learning_rate": "lr", "hidden_size": "dim", "intermediate_size": "ffn_dim",
           "num_hidden_layers": "n_layers", "num_layers": "n_layers",
           "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads",
           "max_position_embeddings": "max_seq_len", "max_epochs": "max_steps",
           "num_experts_per_tok": "top_k"}  # fmt: skip


def _closest(key: str, schema: type) -> str:
    # suggest the closest valid key: another framework's name for it, then the closest spelling
    # of the full dotted path, then of its last segment
    keys = _all_keys(schema)
    section, _, leaf = key.rpartition(".")
    alias = f"{section}.{ALIASES[leaf]}" if section and leaf in ALIASES else ALIASES.get(leaf)
    if alias in keys:
        return f" (did you mean '{alias}'?)"
    hit = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not hit:
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
        near = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        hit = [by_leaf[near[0]]] if near else []
    return f" (did you mean '{hit[0]}'?)" if hit else ""


def explain(err: OmegaConfBaseException, where: str, schema: type) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    name = type(err).__name__
    if "ConfigKeyError" in name or "ConfigAttributeError" in name or "not in struct" in msg:
        return ConfigError(f"{where}: unknown key '{key}'{_closest(key, schema)}")
    if "ValidationError" in name:
        return ConfigError(f"{where}: wrong type for '{key}': {msg}")
    if "Interpolation" in name:
        return ConfigError(f"{where}: bad interpolation at '{key}': {msg}")
    return ConfigError(f"{where}: {msg}" + (f" (at '{key}')" if key else ""))


# ----------------------------------------------------------------------------- shapes and numbers
#
# omegaconf checks each scalar's type, but a section given a list or a scalar (or a list given a
# mapping) fails inside its merge with a TypeError or an opaque message, and NaN and inf pass as
# floats. Two generic walks close both for every schema (recipes, merge configs): `check_layer`
# reads the dataclass annotations against one raw layer (a file, an override) before it is merged,
# so the message names that file or override; `check_finite` walks the loaded object (it sees values
# that came through interpolation). A new field is covered without a line here. A field whose YAML
# key differs from its name declares it as `field(..., metadata={"yaml": "lambda"})`.

_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _yaml_fields(schema: type) -> dict[str, Any]:
    """YAML key -> annotation, for each field of a dataclass schema (and its YAML alias)."""
    hints = typing.get_type_hints(schema)
    out = {}
    for f in fields(schema):
        out[f.name] = hints[f.name]
        if "yaml" in f.metadata:
            out[f.metadata["yaml"]] = hints[f.name]
    return out


def _without_none(tp: Any) -> tuple[Any, bool]:
    """The annotation without `None`, and whether null is allowed."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Any), len(rest) < len(args)
    return tp, tp is Any


def _shape_of(tp: Any) -> str:
    """What a value of annotation `tp` must be, in words."""
    if is_dataclass(tp):
        return "a mapping (section)"
    origin = typing.get_origin(tp) or tp
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    return _SCALARS.get(tp, "a single value")


def _got(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    return repr(v)


def _no_clash(v: Any, base: Any, key: str, where: str) -> None:
    # an untyped field: omegaconf replaces a value by one of another kind, except a list by a
    # mapping or a mapping by a list (its merge stops with a TypeError)
    if isinstance(v, dict) and isinstance(base, dict):
        for k, x in v.items():
            _no_clash(x, base.get(k), f"{key}.{k}", where)
    elif isinstance(v, (dict, list)) and isinstance(base, (dict, list)) and (
        isinstance(v, dict) != isinstance(base, dict)
    ):
        raise ConfigError(
            f"{where}: '{key}' must be {_got(base)} like its earlier value (a list and a mapping "
            f"do not merge), got {_got(v)}"
        )


def _check_value(v: Any, tp: Any, key: str, where: str, base: Any = None) -> None:
    if isinstance(v, str) and ("${" in v or v == "???"):
        return  # an interpolation or a placeholder: checked once resolved
    tp, optional = _without_none(tp)
    if v is None:
        if not optional:
            raise ConfigError(f"{where}: '{key}' must be {_shape_of(tp)}, got null")
        return
    if tp is Any:
        _no_clash(v, base, key, where)
        check_finite(v, where, key)
        return
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    is_map, is_list = is_dataclass(tp) or origin is dict, origin in (list, tuple)
    if is_map != isinstance(v, dict) or is_list != isinstance(v, list):
        raise ConfigError(f"{where}: '{key}' must be {_shape_of(tp)}, got {_got(v)}")
    if is_dataclass(tp):
        _check_mapping(v, tp, key + ".", where, base)
    elif is_map:
        for k, x in v.items():
            below = base.get(k) if isinstance(base, dict) else None
            _check_value(x, args[1] if len(args) == 2 else Any, f"{key}.{k}", where, below)
    elif is_list:
        for i, x in enumerate(v):
            _check_value(x, args[0] if args else Any, f"{key}[{i}]", where)
    elif tp in (int, float):
        if isinstance(v, str) and tp is float:
            try:
                v = float(v)  # omegaconf converts strings ("nan", "inf") the same way
            except ValueError:
                return  # not a number: omegaconf's own message names the field
        check_finite(v, where, key)


def _check_mapping(raw: dict, schema: type, prefix: str, where: str, base: Any) -> None:
    known = _yaml_fields(schema)
    for k, v in raw.items():
        if k in known:  # an unknown key is left to omegaconf, whose message suggests the right one
            below = base.get(k) if isinstance(base, dict) else None
            _check_value(v, known[k], f"{prefix}{k}", where, below)


def _plain(c: Any) -> Any:
    return OmegaConf.to_container(c, resolve=False) if isinstance(c, DictConfig) else c


def check_layer(
    raw: DictConfig | dict, schema: type, where: str, base: DictConfig | dict | None = None
) -> None:
    """Check one raw layer (a YAML file's mapping, an override) against a dataclass schema before
    it is merged onto `base` (the layers before it): every section, list and mapping has its
    shape (null only where the field is Optional), no list or mapping stands for a single value,
    an untyped field does not swap a list for a mapping, and every number is finite.
    Raises a one-line ConfigError naming `where` and the key."""
    _check_mapping(_plain(raw), schema, "", where, _plain(base))


FLOAT32_MAX = 3.4028234663852886e38


def check_finite(obj: Any, where: str, key: str = "", float32: bool = False) -> None:
    """Every float in `obj` (a loaded schema object, a list or mapping of values) is finite;
    with `float32`, within float32's range too (numbers that scale float32 tensors)."""
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ConfigError(f"{where}: {key} must be a finite number, got {obj}")
        if float32 and abs(obj) > FLOAT32_MAX:
            raise ConfigError(f"{where}: {key} is {obj:g}, beyond float32's range "
                              f"(+-{FLOAT32_MAX:.3g}) that the weights are computed in")
    elif is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            name = f.metadata.get("yaml", f.name)
            check_finite(getattr(obj, f.name), where, f"{key}.{name}" if key else name, float32)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            check_finite(v, where, f"{key}.{k}" if key else str(k), float32)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_finite(v, where, f"{key}[{i}]", float32)


def parse_override(ov: str) -> DictConfig:
    """One `key=value` override as a config layer; a value that is not valid YAML (`[0.1`,
    `{text: 1`) is a one-line ConfigError naming the override, not a YAML traceback."""
    import yaml

    try:
        return OmegaConf.from_dotlist([ov])
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        raise ConfigError(f"override {ov!r}: the value is not valid YAML ({problem}); quote a "
                          "value that holds [ ] { } : or # as text") from None


def read_yaml_mapping(path: Path, what: str, shape: str) -> DictConfig:
    """Load a YAML file that must hold a mapping; one-line ConfigErrors for every failure."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors carry a multi-line message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: not valid YAML: {first}") from None
    if raw is None or isinstance(raw, ListConfig):
        raise ConfigError(f"{path}: {shape}")
    key = next(iter(raw), None)
    if len(raw) == 1 and not OmegaConf.is_missing(raw, key) and raw[key] is None:
        # OmegaConf turns a file that YAML reads as one string (any text file) into
        # {text: None}: name the file and quote only its start, never the whole of it
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                top = yaml.safe_load(f)
        except Exception:
            top = None
        if isinstance(top, str):
            start = " ".join(top.split())
            start = start[:60] + ("..." if len(start) > 60 else "")
            raise ConfigError(f"{path}: not a {what}: YAML reads it as text ({start!r}); {shape}")
    return raw
