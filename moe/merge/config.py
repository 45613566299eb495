"""Merge configuration: a YAML in the shape mergekit users know, loaded into typed dataclasses.

    merge_method: ties
    base_model: runs/seed/model
    models:
      - model: runs/code-a/model
        parameters: {weight: 1.0, density: 0.5}
      - model: runs/code-b/model
        parameters: {weight: 0.5}
    parameters: {lambda: 1.0, normalize: true, seed: 0}
    dtype: float32
    expert: code               # MoE inputs: merge only this expert's slices
    allow_cross_family: false
    out: runs/code-merged

Loading goes through `OmegaConf.structured(MergeConfig)`: an unknown key, a value of the wrong
type, a section of the wrong shape or a NaN/inf number (`moe.config.check.check_layer`, for every
field) fails at load time with one line naming the key and the file; `validate` then checks what
spans fields (method exists, slerp has two models and `t`, densities in (0, 1], inputs exist).
Relative model paths are relative to the current directory, as for every other command.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moe.config.check import (
    ConfigError,
    check_finite,
    check_layer,
    explain,
    parse_override,
    read_yaml_mapping,
)
from moe.delta.merge_source import input_problem
from moe.merge import registry
from moe.merge.gradients import check_form, coerce, is_scalar, value_at
from moe.merge.mergekit import check as check_mergekit
from moe.merge.mergekit import check_raw as check_mergekit_raw
from moe.merge.method_params import FORM_KEYS
from moe.merge.method_params import check as check_method_params

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelParameters:
    """Per-model parameters; unset ones take the global default under `parameters:`. Each may
    be a number, a gradient over the layers or a list of {filter, value} entries
    (moe/merge/gradients.py, mergekit's forms)."""

    weight: Any = None
    density: Any = None
    gamma: Any = None  # breadcrumbs*: fraction of largest magnitudes dropped
    epsilon: Any = None  # della*: keep probabilities span density ± epsilon


@dataclass
class ModelEntry:
    model: str = MISSING  # checkpoint, run directory or Hugging Face model directory
    parameters: ModelParameters = field(default_factory=ModelParameters)


@dataclass
class SliceSource:
    """One model's layers [a, b) in a mergekit `slices:` entry."""

    model: str = MISSING
    layer_range: list[int] = MISSING  # [first, end): end excluded, as in mergekit
    parameters: ModelParameters = field(default_factory=ModelParameters)


@dataclass
class SliceEntry:
    """Layers of the output: the method merges layer j of every source's range (mergekit)."""

    sources: list[SliceSource] = field(default_factory=list)


@dataclass
class MergeParameters:
    """Global parameters. `lambda` in the YAML is stored as `scale` (a Python keyword)."""

    # weight, density and t: a number, a gradient or {filter, value} entries (gradients.py)
    weight: Any = 1.0  # default per-model weight
    density: Any = 1.0  # default per-model density (ties, dare_*)
    normalize: bool | None = None  # None: the method's default (see docs/merge.md)
    scale: float = field(default=1.0, metadata={"yaml": "lambda"})  # λ: scales the task vector
    t: Any = None  # slerp interpolation factor (0 = first model, 1 = second)
    seed: int = 0  # DARE's random drop
    # method-specific (mergekit's names; None = the method's default, refused by other methods;
    # moe/merge/method_params.py, docs/merge.md)
    gamma: Any = None  # breadcrumbs, breadcrumbs_ties (per-model default)
    epsilon: Any = None  # della, della_linear (per-model default)
    rescale: bool | None = None  # della, della_linear: divide kept entries by their keep prob.
    select_topk: Any = None  # sce
    filter_wise: bool | None = None  # model_stock
    nuslerp_flatten: bool | None = None  # nuslerp
    nuslerp_row_wise: bool | None = None  # nuslerp
    normalize_weights: bool | None = None  # multislerp
    eps: float | None = None  # multislerp
    max_iter: int | None = None  # karcher
    tol: float | None = None  # karcher


@dataclass
class MergeConfig:
    merge_method: str = MISSING
    models: list[ModelEntry] = field(default_factory=list)
    # mergekit layer stacking: the output's layers are the slices' layers in order (see
    # moe/merge/slices.py); instead of `models:`
    slices: list[SliceEntry] = field(default_factory=list)
    base_model: str | None = None
    parameters: MergeParameters = field(default_factory=MergeParameters)
    dtype: str | None = None  # float32 | bfloat16 | float16; None keeps each tensor's dtype
    expert: str | None = None  # MoE inputs: merge only this expert's slices
    allow_cross_family: bool = False  # skip the lineage (base/family) check, never the shape check
    out: str | None = None  # output directory (the `out` argument of merge() wins)
    # mergekit's output keys (moe/merge/mergekit.py): the output's dtype (default: dtype), its
    # tokenizer (base | union | a model directory; `tokenizer: {source: ...}` alike), its chat
    # template (auto | Jinja text)
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: dict[str, Any] | None = None
    chat_template: str | None = None

    def weight(self, i: int, name: str = "", p: float = 0.0) -> float:
        """Model i's weight for tensor `name` at gradient position `p` (gradients.py)."""
        return _resolve(self.models[i].parameters.weight, self.parameters.weight, name, p)

    def density(self, i: int, name: str = "", p: float = 0.0) -> float:
        return _resolve(self.models[i].parameters.density, self.parameters.density, name, p)

    def t(self, name: str = "", p: float = 0.0) -> float:
        """slerp's t for tensor `name` (0.5 where no form gives one)."""
        return value_at(self.parameters.t, name, p, 0.5)

    def method_params(self, name: str = "", p: float = 0.0, entries: list | None = None):
        """Method-specific values for tensor `name` (`MethodParams.extra`); `entries`: the merged
        models' parameters in order (default: `models:`'s)."""
        from moe.merge.method_params import resolve

        return resolve(self, name, p, [m.parameters for m in self.models] if entries is None
                       else entries)  # fmt: skip

    def normalize(self) -> bool:
        n = self.parameters.normalize
        return registry.get(self.merge_method).normalize_default if n is None else n


def _resolve(own: Any, default: Any, name: str, p: float) -> float:
    """A model's own form of a parameter, else the global one (per tensor, as mergekit)."""
    got = value_at(own, name, p)
    return value_at(default, name, p, 1.0) if got is None else got


def _rename_lambda(raw: Any, where: str) -> None:
    params = raw.get("parameters") if isinstance(raw, DictConfig) else None
    if isinstance(params, DictConfig) and "lambda" in params:
        if "scale" in params:
            raise ConfigError(f"{where}: parameters: give `lambda` or `scale`, not both")
        params["scale"] = params.pop("lambda")


def _check_entries(raw: DictConfig, where: str) -> None:
    """Check each `models:` entry alone: omegaconf's error keys inside a list of dataclasses
    lose the list index, and a message must say which model is wrong."""
    models = raw.get("models")
    if not isinstance(models, ListConfig):
        return
    for i, m in enumerate(models):
        if not isinstance(m, DictConfig):
            raise ConfigError(f"{where}: models[{i}] must be a mapping with model: and parameters:")
        try:
            OmegaConf.merge(OmegaConf.structured(ModelEntry), m)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or ""
            msg = str(explain(e, where, ModelEntry))
            raise ConfigError(msg.replace(f"'{key}'", f"'models[{i}].{key}'", 1)) from None


def merge_config_from_dict(
    d: dict[str, Any] | DictConfig, where: str = "merge config"
) -> MergeConfig:
    """Build and validate a MergeConfig from a mapping (the YAML's content)."""
    try:
        raw = d if isinstance(d, DictConfig) else OmegaConf.create(d)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {str(e).splitlines()[0]}") from None
    check_mergekit_raw(raw, where)  # mergekit keys not implemented: refused, saying why
    check_layer(raw, MergeConfig, where)  # sections' shapes, finite numbers
    _rename_lambda(raw, where)
    _check_entries(raw, where)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(MergeConfig), raw)
        obj: MergeConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise explain(e, where, MergeConfig) from None
    for p in [obj.parameters] + [m.parameters for m in obj.models] + [
            s.parameters for sl in obj.slices for s in sl.sources]:  # fmt: skip
        for k in ("weight", "density", "t", *FORM_KEYS):
            if hasattr(p, k):
                setattr(p, k, coerce(getattr(p, k)))
    # values that came through interpolation; every weight scales float32 tensors, so a number
    # beyond float32's range (1e39) would overflow there
    check_finite(obj, where, float32=True)
    validate(obj, where)
    return obj


def load_merge_config(
    path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()
) -> MergeConfig:
    """Read MERGE.yaml (plus `key=value` overrides) into a validated MergeConfig."""
    path = Path(path)
    raw = read_yaml_mapping(
        path, "merge config", "a merge config must be a mapping (merge_method:, models:, ...)"
    )
    check_layer(raw, MergeConfig, str(path))  # before an override is merged onto it
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value")
        try:
            layer = parse_override(ov)
            check_layer(layer, MergeConfig, f"override {ov!r}", raw)
            # the fields that take any form (t, weight, density) are not typed: NaN/inf here
            key, _, value = ov.partition("=")
            num = coerce(value)
            if (key.rsplit(".", 1)[-1] in ("t", "weight", "density", *FORM_KEYS)
                    and isinstance(num, float)
                    and not math.isfinite(num)):  # fmt: skip
                raise ConfigError(f"override {ov!r}: {key} must be a finite number, got {num}")
            raw = OmegaConf.merge(raw, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {ov!r}: {str(e).splitlines()[0]}") from None
    return merge_config_from_dict(raw, str(path))


def validate(c: MergeConfig, where: str = "merge config") -> None:
    """Checks across fields; every message names the field."""

    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{where}: {msg}")

    try:
        spec = registry.get(c.merge_method)
    except ConfigError as e:
        raise bad(str(e)) from None
    _check_forms(c, spec, bad)
    check_mergekit(c, bad)  # dtype, out_dtype, tokenizer, chat_template, model references
    check_method_params(c, spec, bad)
    if c.slices:
        from moe.merge.slices import validate_slices

        validate_slices(c, spec, bad)
        return
    if not c.models:
        raise bad("models: list at least one model to merge (or slices:)")
    if spec.exactly_one and len(c.models) != 1:
        raise bad(f"models: {c.merge_method} takes exactly one model, got {len(c.models)}")
    if spec.exactly_two and len(c.models) != 2:
        raise bad(f"models: {c.merge_method} merges exactly two models, got {len(c.models)}")
    if spec.exactly_two and c.parameters.t is None:
        raise bad(f"parameters.t: {c.merge_method} needs t (0 = first model, 1 = second)")
    if spec.needs_base and c.base_model is None:
        raise bad(f"base_model: {c.merge_method} needs a base model (task vectors are θ - base)")
    scalar = is_scalar(c.parameters.weight) and all(
        is_scalar(m.parameters.weight) for m in c.models)  # fmt: skip
    if scalar and c.normalize() and abs(sum(c.weight(i) for i in range(len(c.models)))) < 1e-12:
        raise bad("models[*].parameters.weight: weights sum to 0, cannot normalize")
    if c.dtype is not None and c.dtype not in DTYPES:
        raise bad(f"dtype: {c.dtype!r} is not one of {', '.join(DTYPES)}")
    paths = ([("base_model", c.base_model)] if c.base_model is not None else []) + [
        (f"models[{i}].model", m.model) for i, m in enumerate(c.models)
    ]
    for key, p in paths:
        problem = input_problem(p)
        if problem:
            raise bad(f"{key}: {problem}")


def _check_forms(c: MergeConfig, spec, bad) -> None:
    """Every t / weight / density form is well made and in range (gradients.py); a density
    below 1 needs a method that uses it."""
    def density_ok(d: float) -> bool:
        return 0.0 < d <= 1.0

    forms = [("parameters.t", c.parameters.t, lambda t: 0.0 <= t <= 1.0, "in [0, 1]"),
             ("parameters.density", c.parameters.density, density_ok, "in (0, 1]"),
             ("parameters.weight", c.parameters.weight, lambda w: True, "a number")]
    entries = [(f"models[{i}]", m.parameters) for i, m in enumerate(c.models)] + [
        (f"slices[{i}].sources[{k}]", s.parameters)
        for i, sl in enumerate(c.slices) for k, s in enumerate(sl.sources)]
    for where, p in entries:
        forms += [(f"{where}.parameters.density", p.density, density_ok, "in (0, 1]"),
                  (f"{where}.parameters.weight", p.weight, lambda w: True, "a number")]
    for key, v, ok, rule in forms:
        try:
            check_form(v, key, ok, rule)
        except ConfigError as e:
            raise bad(str(e)) from None
        if key.endswith("density") and not spec.uses_density and _below_one(v):
            users = ", ".join(n for n, m in registry.METHODS.items() if m.uses_density)
            raise bad(f"{key}: {c.merge_method} does not use density ({users} do)")


def _below_one(v: Any) -> bool:
    if v is None:
        return False
    if isinstance(v, (int, float)):
        return v < 1.0
    return any(_below_one(e["value"] if isinstance(e, dict) else e) for e in v)

