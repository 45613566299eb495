"""Experiments that `moe run` runs besides the branch-train-mix study (moe/study/).

Each is switched on by its own recipe section (`init_study:`, ...) and implemented in its own
module as two functions: `plan(recipe, seeds) -> str` (what `--dry-run` prints) and
`run(recipe, seeds, recipe_path) -> Path` (the report it writes). A recipe switches on at most
one. A new experiment adds one entry here and its section in moe/config.py.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moe.config import ConfigError, Recipe


@dataclass(frozen=True)
class Experiment:
    section: str  # the recipe section that configures it
    active: Callable[[Recipe], bool]  # is this recipe one of these experiments?
    module: str  # defines plan(recipe, seeds) and run(recipe, seeds, recipe_path)
    description: str

    def _fn(self, name: str) -> Callable:
        return getattr(importlib.import_module(self.module), name)

    def plan(self, recipe: Recipe, seeds: int | None) -> str:
        return self._fn("plan")(recipe, seeds)

    def run(self, recipe: Recipe, seeds: int | None, recipe_path: str | None) -> Path:
        return self._fn("run")(recipe, seeds, recipe_path)


EXPERIMENTS: dict[str, Experiment] = {
    e.section: e
    for e in (
        Experiment("init_study", lambda r: bool(r.init_study.arms), "moe.surgery.init_study",
                   "initialise from a trained model's weight distribution (issue 15)"),
        Experiment("surgery", lambda r: r.surgery.kind is not None, "moe.surgery.surgery_study",
                   "grow, depth probe, shrink, retokenize: measured (issue 13)"),
        Experiment("fleet", lambda r: r.fleet.kind is not None, "moe.delta.study",
                   "fine-tune deltas: size vs bpb per compression, a simulated fleet (issue 16)"),
        Experiment("prune", lambda r: r.prune.kind is not None, "moe.surgery.prune_study",
                   "pruning per domain (curves, 3x3 matrix, overlap); train large then compress "
                   "(issue 14)"),
    )
}


def experiment_of(recipe: Recipe) -> Experiment | None:
    """The experiment a recipe switches on, or None for the study; two at once is an error."""
    on = [e for e in EXPERIMENTS.values() if e.active(recipe)]
    if len(on) > 1:
        raise ConfigError(f"recipe {recipe.name}: sections {', '.join(e.section for e in on)} "
                          "each switch on an experiment; a recipe runs one")
    return on[0] if on else None
