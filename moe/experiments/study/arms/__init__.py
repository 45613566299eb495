"""The study's arms, registered by name: one small module per arm.

An arm declares
- the stages it trains or builds (`stages`), each with the stages it depends on;
- the models it contributes to the evaluation (`models`), each with its lineage: the stages
  whose training compute it embodies (the seed is counted once), from which the compute ledger
  derives tokens, FLOPs and in-domain tokens; and
- the label the report shows.

Every module of this package is imported the first time the registry is read (discovery), so a
new arm is one new file here. `moe run --list-arms` prints the registry, in the arms' `order`
(the report's answer table's). A recipe names arms in `study.arms`; the runner orders all stages
of the chosen arms by their dependencies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from moe.config.registry import Registry

if TYPE_CHECKING:
    from moe.experiments.study.context import StudyContext


@dataclass(frozen=True)
class StageSpec:
    """One step of the study that writes `stages/<name>/model`."""

    name: str
    kind: str  # train | split | merge | assemble
    deps: tuple[str, ...]
    run: Callable[[], None] = field(compare=False)
    steps: int = 0  # training steps (0 for stages that do not train)
    tokens: int = 0  # planned training tokens, for the ETA


@dataclass(frozen=True)
class ModelSpec:
    """One model the study evaluates on every domain."""

    name: str  # key in results.json `models`
    label: str  # row label in the report's arm table (empty: not an arm of the main table)
    lineage: tuple[str, ...]  # stages whose compute this model embodies (seed included)
    checkpoint: str | None = None  # stage holding its checkpoint
    members: tuple[str, ...] = ()  # an ensemble's member stages (checkpoint None)
    role: str = ""  # seed | branch | finetune | merge | moe | monolith | ensemble | average
    extra: dict = field(default_factory=dict, compare=False)  # domain, family, ...


class Arm:
    """Base class: subclasses set `name`, `label`, `description` and `order`, and build specs."""

    name: str = ""
    label: str = ""
    description: str = ""
    requires: tuple[str, ...] = ()  # arms whose stages this one uses
    # its row in the report's answer table and in `moe run --list-arms`: the experts first, the
    # reference next, the controls, the seed last
    order: int = 90

    def stages(self, ctx: StudyContext) -> list[StageSpec]:
        return []

    def models(self, ctx: StudyContext) -> list[ModelSpec]:
        return []


ARMS: Registry[type[Arm]] = Registry(
    "study arm", discover=__name__, order="attribute", field="study.arms", noun="arm"
)


def register(cls: type[Arm]) -> type[Arm]:
    return ARMS.register(cls.name, cls)


def get_arm(name: str) -> Arm:
    return ARMS[name]()


def with_requirements(names: list[str]) -> list[str]:
    """The arms to run: the chosen ones plus the arms they need, in a stable order."""
    out: list[str] = []

    def add(n: str) -> None:
        for dep in get_arm(n).requires:
            add(dep)
        if n not in out:
            out.append(n)

    for n in names:
        add(n)
    return out

