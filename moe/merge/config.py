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
type, a section of the wrong shape or a NaN/inf number (`moe.config.check_layer`, for every field)
fails at load time with one line naming the key and the file; `validate` then checks what
spans fields (method exists, slerp has two models and `t`, densities in (0, 1], inputs exist).
Relative model paths are relative to the current directory, as for every other command.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moe.config import ConfigError, _explain, check_finite, check_layer, read_yaml_mapping
from moe.merge import registry
from moe.merge.sources import describe_problem

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelParameters:
    """Per-model parameters; unset ones take the global default under `parameters:`."""

    weight: float | None = None
    density: float | None = None


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

    weight: float = 1.0  # default per-model weight
    density: float = 1.0  # default per-model density (ties, dare_*)
    normalize: bool | None = None  # None: the method's default (see docs/merge.md)
    scale: float = field(default=1.0, metadata={"yaml": "lambda"})  # λ: scales the task vector
    t: float | None = None  # slerp interpolation factor (0 = first model, 1 = second)
    seed: int = 0  # DARE's random drop


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

    def weight(self, i: int) -> float:
        w = self.models[i].parameters.weight
        return self.parameters.weight if w is None else w

    def density(self, i: int) -> float:
        d = self.models[i].parameters.density
        return self.parameters.density if d is None else d

    def normalize(self) -> bool:
        n = self.parameters.normalize
        return registry.get(self.merge_method).normalize_default if n is None else n


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
            msg = str(_explain(e, where, ModelEntry))
            raise ConfigError(msg.replace(f"'{key}'", f"'models[{i}].{key}'", 1)) from None


def merge_config_from_dict(
    d: dict[str, Any] | DictConfig, where: str = "merge config"
) -> MergeConfig:
    """Build and validate a MergeConfig from a mapping (the YAML's content)."""
    try:
        raw = d if isinstance(d, DictConfig) else OmegaConf.create(d)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {str(e).splitlines()[0]}") from None
    check_layer(raw, MergeConfig, where)  # sections' shapes, finite numbers
    _rename_lambda(raw, where)
    _check_entries(raw, where)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(MergeConfig), raw)
        obj: MergeConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise _explain(e, where, MergeConfig) from None
    check_finite(obj, where)  # values that came through interpolation
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
            layer = OmegaConf.from_dotlist([ov])
            check_layer(layer, MergeConfig, f"override {ov!r}", raw)
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
    if spec.exactly_two:
        if c.parameters.t is None:
            raise bad(f"parameters.t: {c.merge_method} needs t (0 = first model, 1 = second)")
        if not 0.0 <= c.parameters.t <= 1.0:
            raise bad(f"parameters.t must be in [0, 1], got {c.parameters.t}")
    if spec.needs_base and c.base_model is None:
        raise bad(f"base_model: {c.merge_method} needs a base model (task vectors are θ - base)")
    for i in range(len(c.models)):
        d = c.density(i)
        if not 0.0 < d <= 1.0:
            raise bad(f"models[{i}].parameters.density must be in (0, 1], got {d}")
        if d < 1.0 and not spec.uses_density:
            raise bad(
                f"models[{i}].parameters.density: {c.merge_method} does not use density "
                "(ties, dare_linear and dare_ties do)"
            )
    if not 0.0 < c.parameters.density <= 1.0:
        raise bad(f"parameters.density must be in (0, 1], got {c.parameters.density}")
    weights = [c.weight(i) for i in range(len(c.models))]
    if c.normalize() and abs(sum(weights)) < 1e-12:
        raise bad("models[*].parameters.weight: weights sum to 0, cannot normalize")
    if c.dtype is not None and c.dtype not in DTYPES:
        raise bad(f"dtype: {c.dtype!r} is not one of {', '.join(DTYPES)}")
    paths = ([("base_model", c.base_model)] if c.base_model is not None else []) + [
        (f"models[{i}].model", m.model) for i, m in enumerate(c.models)
    ]
    for key, p in paths:
        problem = describe_problem(p)
        if problem:
            raise bad(f"{key}: {problem}")
