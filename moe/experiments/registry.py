"""The experiments `moe run` dispatches to (see the package docstring): `Experiment`, the
registry and `experiment_of`."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moe.config import ConfigError, Recipe
from moe.config.registry import Registry
from moe.experiments.common import experiment_dir


@dataclass(frozen=True)
class Experiment:
    section: str  # the recipe section that configures it
    active: Callable[[Recipe], bool]  # is this recipe one of these experiments?
    module: str  # defines plan(recipe, seeds) and run(recipe, seeds, recipe_path)
    description: str
    # recipe keys whose change only adds (or drops) runs, each cached by its own name: a
    # finished directory is extended, not refused, when they change (`seeds` always is)
    extends: tuple[str, ...] = ()

    def _fn(self, name: str) -> Callable:
        return getattr(importlib.import_module(self.module), name)

    def check(self, recipe: Recipe) -> None:
        """Checks every experiment shares (its own are in its plan and run): the recipe's model
        must fit in memory to train."""
        from moe.train.stages import check_fits

        check_fits(recipe, recipe.model, "model")

    def plan(self, recipe: Recipe, seeds: int | None) -> str:
        self.check(recipe)
        return self._fn("plan")(recipe, seeds)

    def run(self, recipe: Recipe, seeds: int | None, recipe_path: str | None) -> Path:
        """Run (or resume) it in its locked run directory (see `experiment_dir`)."""
        from moe.io.output import claim, recipe_inputs

        self.check(recipe)
        out = Path(recipe.out_dir)
        with claim(out, recipe_inputs(recipe)):  # before anything in it is touched
            out.mkdir(parents=True, exist_ok=True)
            experiment_dir(recipe, self.section, self.extends)
            # the directory is ready: the experiment itself never empties it
            return self._fn("run")(dataclasses.replace(recipe, overwrite=False), seeds,
                                   recipe_path)


# section -> experiment; the study (moe/experiments/study/) is what runs when none is on
EXPERIMENTS: Registry[Experiment] = Registry("experiment", discover="moe.experiments")


def register(e: Experiment) -> Experiment:
    return EXPERIMENTS.register(e.section, e)


def experiment_of(recipe: Recipe) -> Experiment | None:
    """The experiment a recipe switches on, or None for the study; two at once is an error."""
    on = [e for e in EXPERIMENTS.values() if e.active(recipe)]
    if len(on) > 1:
        raise ConfigError(f"recipe {recipe.name}: sections {', '.join(e.section for e in on)} "
                          "each switch on an experiment; a recipe runs one")
    return on[0] if on else None
