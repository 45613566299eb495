"""Delta compression methods, registered by name (one file each in moe/delta/, found by discovery:
a new step is one new file whose `@register(...)` runs on import), and the spec that chains them.

A compression spec is `STEP[+STEP]`, e.g. `topk:0.05+int8`, `dare:0.1`, `lowrank:4+int4`,
`topk:0.1+bitdelta`, `none` (float32 values, the dense reference). Steps are of two kinds:

    structure  which entries (or factors) survive:  topk:DENSITY | dare:DENSITY | lowrank:RANK
    values     how the surviving numbers are stored: int8 | int4 | bitdelta | fp16
               (float32 when no values step is given)

At most one of each, structure first. A structure step maps a dense delta tensor to a `Coded`
(its layout and float values); a values step then encodes each float array of it (the values of a
sparse or dense layout, or the two factors of a low-rank one). Both are pure functions of their
inputs and a `torch.Generator` (DARE), so they are testable against hand-computed cases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moe.config import ConfigError
from moe.config.registry import Registry


@dataclass
class Coded:
    """One tensor's compressed delta before its values are encoded.

    layout   dense: arrays {"v": (numel,)}
             sparse: arrays {"v": (k,)} + int tensor "idx" (k,) of flat positions
             lowrank: arrays {"A": (m, r), "B": (r, n)} with delta ≈ A @ B
    """

    layout: str
    shape: tuple[int, ...]
    arrays: dict[str, torch.Tensor]  # float arrays to be encoded by the values step
    idx: torch.Tensor | None = None  # sparse layout: flat positions (int64), sorted
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    name: str
    kind: str  # "structure" | "values"
    arg: str  # "float" (a density in (0, 1]) | "int" (a rank >= 1) | "" (no argument)
    fn: Callable  # structure: (delta, arg, gen) -> Coded; values: (x) -> {suffix: tensor}
    paper: str
    decode: Callable | None = None  # values steps: ({suffix: tensor}, numel) -> float64 (numel,)


STEPS: Registry[Step] = Registry("delta compression step", discover="moe.delta")


def register(name: str, kind: str, arg: str, paper: str,
             decode: Callable | None = None) -> Callable[[Callable], Callable]:  # fmt: skip
    def deco(fn: Callable) -> Callable:
        STEPS.register(name, Step(name, kind, arg, fn, paper, decode))
        return fn

    return deco


def steps() -> dict[str, Step]:
    return dict(STEPS.items())


def listed(kind: str) -> str:
    """The registered steps of one kind ("structure" | "values") as words: 'dare, topk or int8'."""
    names = [n for n, s in STEPS.items() if s.kind == kind]
    return " or ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else "".join(names)


def usage(kind: str) -> list[str]:
    """How each registered step of one kind is written in a spec: topk:DENSITY, lowrank:RANK."""
    args = {"float": ":DENSITY", "int": ":RANK", "": ""}
    return [f"{n}{args[s.arg]}" for n, s in STEPS.items() if s.kind == kind]


@dataclass(frozen=True)
class Spec:
    """A parsed compression spec: (step, argument) pairs, structure first."""

    text: str
    structure: tuple[Step, float | int | None] | None
    values: Step | None

    @property
    def lossless(self) -> bool:
        return self.structure is None and self.values is None


def parse_spec(text: str) -> Spec:
    """'topk:0.1+int8' -> Spec. Errors name the bad part."""
    text = str(text).strip()
    if text in ("none", "fp32", "float32"):
        return Spec("none", None, None)
    structure, values = None, None
    for part in text.split("+"):
        name, _, arg = part.partition(":")
        step = STEPS.get(name, None)
        if step is None:
            raise ConfigError(f"compression {text!r}: unknown step {name!r}; steps are "
                              f"{', '.join(STEPS.names())} (joined with +, e.g. topk:0.1+int8)")
        if step.kind == "structure":
            if structure is not None:
                raise ConfigError(f"compression {text!r}: one structure step at most "
                                  f"({listed('structure')})")
            if values is not None:
                raise ConfigError(f"compression {text!r}: the structure step ({name}) comes "
                                  "before the values step")
            structure = (step, _arg(text, step, arg))
        else:
            if values is not None:
                raise ConfigError(f"compression {text!r}: one values step at most "
                                  f"({listed('values')})")
            if arg:
                raise ConfigError(f"compression {text!r}: {name} takes no argument")
            values = step
    if structure is not None and structure[0].name == "lowrank" and values is not None \
            and values.name == "bitdelta":
        raise ConfigError(f"compression {text!r}: bitdelta stores signs of delta entries; it "
                          "does not combine with lowrank factors")
    return Spec(text, structure, values)


def _arg(text: str, step: Step, arg: str) -> float | int:
    if not arg:
        raise ConfigError(f"compression {text!r}: {step.name} needs an argument "
                          f"({step.name}:{'DENSITY' if step.arg == 'float' else 'RANK'})")
    try:
        v = float(arg) if step.arg == "float" else int(arg)
    except ValueError:
        raise ConfigError(f"compression {text!r}: {step.name}:{arg} is not a "
                          f"{'number' if step.arg == 'float' else 'whole number'}") from None
    if step.arg == "float" and not 0.0 < v <= 1.0:
        raise ConfigError(f"compression {text!r}: {step.name} density must be in (0, 1], "
                          f"got {arg}")
    if step.arg == "int" and v < 1:
        raise ConfigError(f"compression {text!r}: {step.name} rank must be >= 1, got {arg}")
    return v
