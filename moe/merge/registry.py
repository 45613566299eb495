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

from collections.abc import Callable
from dataclasses import dataclass

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


MergeFn = Callable[[torch.Tensor | None, list[torch.Tensor], MethodParams], torch.Tensor]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: MergeFn
    needs_base: bool  # task vectors (θ - base) need a base model
    normalize_default: bool  # what `normalize` means when the config leaves it unset
    uses_density: bool
    exactly_two: bool = False  # slerp
    exactly_one: bool = False  # passthrough


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
) -> Callable[[MergeFn], MergeFn]:
    def deco(fn: MergeFn) -> MergeFn:
        METHODS.register(name, MethodSpec(
            name, fn, needs_base, normalize_default, uses_density, exactly_two, exactly_one
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
