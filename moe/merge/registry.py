"""Merge methods, registered by name: one file each in moe/merge/, found by discovery (a new
method is one new file whose `@register(...)` runs on import).

A method is a pure function on one tensor's values across the inputs:

    method(base, tensors, params) -> merged

`base` is the base model's tensor (None when the config names no base model), `tensors` the merged
models' tensors (same shape), `params` a `MethodParams`. Inputs arrive in float32 (or float64) and
the result is returned in the same dtype; the caller casts to the output dtype. Methods never see
file names or lineage: `moe.merge.merge` does I/O and checks, so methods stay hand-checkable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from moe.config import ConfigError
from moe.config.registry import Registry
from moe.delta.primitives import tensor_generator  # noqa: F401 (the merge methods' generator)


@dataclass(frozen=True)
class MethodParams:
    """Per-tensor parameters of one merge call (lists are per model, in config order)."""

    weights: list[float]
    densities: list[float]
    normalize: bool
    scale: float = 1.0  # the `lambda` of task arithmetic / TIES / DARE
    t: float = 0.5  # slerp interpolation factor
    seed: int = 0
    name: str = ""  # tensor name: seeds DARE's per-tensor generator
    # method-specific values by mergekit's names (`Param`s): a list per model for a per-model
    # parameter, else one value; a missing key takes the method's default
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def get(self, key: str, default: Any) -> Any:
        """Method-specific parameter `key` (`default` when the caller gave none)."""
        return self.extra.get(key, default)

    def per_model(self, key: str, default: float) -> list[float]:
        """Per-model parameter `key`, one value per merged model."""
        v = self.extra.get(key)
        return [default] * len(self.weights) if v is None else [float(x) for x in v]


MergeFn = Callable[[torch.Tensor | None, list[torch.Tensor], MethodParams], torch.Tensor]


@dataclass(frozen=True)
class Param:
    """A method-specific parameter, spelled as mergekit spells it (moe/merge/method_params.py
    reads it from the config, range-checks it at load time and passes it in `MethodParams.extra`).

    `default`'s type is the parameter's: a float may be any form of gradients.py (resolved per
    tensor); a bool or an int is one value. `ok` / `rule` range-check every number given.
    """

    name: str
    default: float | int | bool
    ok: Callable[[float], bool] = lambda v: True
    rule: str = "a number"
    per_model: bool = False  # also under models[i].parameters (a mergekit tensor parameter)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: MergeFn
    needs_base: bool  # task vectors (θ - base) need a base model
    normalize_default: bool  # what `normalize` means when the config leaves it unset
    uses_density: bool
    exactly_two: bool = False  # slerp
    exactly_one: bool = False  # passthrough
    params: tuple[Param, ...] = ()  # method-specific parameters
    n_models: tuple[int, int | None] = (1, None)  # models merged (base excluded): min, max
    uses_weight: bool = True  # False: `weight` is refused (the method computes its own)
    # extra load-time check across fields: check(config, bad) raises bad("field: reason")
    check: Callable[[Any, Callable[[str], Exception]], None] | None = None


METHODS: Registry[MethodSpec] = Registry(
    "merge method", discover="moe.merge", field="merge_method", noun="method"
)


def register(
    name: str,
    *,
    needs_base: bool,
    normalize_default: bool,
    uses_density: bool = False,
    exactly_two: bool = False,
    exactly_one: bool = False,
    params: tuple[Param, ...] = (),
    n_models: tuple[int, int | None] = (1, None),
    uses_weight: bool = True,
    check: Callable[[Any, Callable[[str], Exception]], None] | None = None,
) -> Callable[[MergeFn], MergeFn]:
    def deco(fn: MergeFn) -> MergeFn:
        METHODS.register(name, MethodSpec(
            name, fn, needs_base, normalize_default, uses_density, exactly_two, exactly_one,
            params, n_models, uses_weight, check,
        ))  # fmt: skip
        return fn

    return deco


def get(name: str) -> MethodSpec:
    return METHODS[name]


def names() -> list[str]:
    return METHODS.names()


def task_vectors(base: torch.Tensor | None, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    if base is None:
        raise ConfigError("this merge method needs base_model (task vectors are θ - base)")
    return [t - base for t in tensors]


def weighted_sum(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        out.add_(d, alpha=w)
    return out


def linear_combination(base: torch.Tensor, deltas: list[torch.Tensor],
                       p: MethodParams) -> torch.Tensor:
    """base + λ Σ_i w_i δ_i, divided by Σ_i w_i under normalize: the task-arithmetic family's
    last step. A weight sum under 1e-8 divides by 1 (mergekit's rule), never by zero."""
    delta = weighted_sum(deltas, p.weights)
    if p.normalize and abs(sum(p.weights)) >= 1e-8:
        delta /= sum(p.weights)
    return base + p.scale * delta
