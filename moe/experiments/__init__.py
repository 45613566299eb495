"""Experiments that `moe run` runs besides the branch-train-mix study (moe/experiments/study/).

Each is switched on by its own recipe section (`init_study:`, ...) and implemented in its own
package: its `__init__.py` registers an `Experiment` in `EXPERIMENTS` (every package here is
imported the first time the registry is read), and its module defines two functions:
`plan(recipe, seeds) -> str` (what `--dry-run` prints) and `run(recipe, seeds, recipe_path) ->
Path` (the report it writes). A recipe switches on at most one. A new experiment is one new
package here and its section in moe/config/.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moe.config import ConfigError, Recipe, to_dict, to_yaml
from moe.config.registry import Registry


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
EXPERIMENTS: Registry[Experiment] = Registry("experiment", discover=__name__)


def register(e: Experiment) -> Experiment:
    return EXPERIMENTS.register(e.section, e)


def experiment_of(recipe: Recipe) -> Experiment | None:
    """The experiment a recipe switches on, or None for the study; two at once is an error."""
    on = [e for e in EXPERIMENTS.values() if e.active(recipe)]
    if len(on) > 1:
        raise ConfigError(f"recipe {recipe.name}: sections {', '.join(e.section for e in on)} "
                          "each switch on an experiment; a recipe runs one")
    return on[0] if on else None


def experiment_dir(recipe: Recipe, section: str, extends: tuple[str, ...] = ()) -> Path:
    """Prepare an experiment's run directory (the caller holds its lock): `overwrite` empties it;
    a directory whose recorded recipe differs in anything but the section's `seeds` and the
    `extends` keys is refused, since its finished runs (cached per run, reused on resume) would
    be mixed with new ones; the resolved recipe is saved as `recipe.yaml`."""
    from moe.io.checkpoint import atomic_write_text

    out = Path(recipe.out_dir)
    saved = out / "recipe.yaml"
    if recipe.overwrite:
        for p in out.iterdir():
            if p.name != ".lock":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    elif saved.is_file() and recipe_changed(saved, recipe, ignore=(f"{section}.seeds", *extends)):
        raise ConfigError(f"{out} holds a run ({section}) of a different recipe; pass "
                          "--overwrite to replace it or choose another out_dir")
    atomic_write_text(saved, to_yaml(recipe))
    return out


def cached_run(out: Path, name: str, fn: Callable[[], dict], label: str,
               summary: Callable[[dict], str] | None = None) -> dict:  # fmt: skip
    """One run of an experiment, cached as `out/runs/<name>.json`: read back if a previous
    invocation finished it (this is how every experiment resumes), else `fn()` computes its
    record, which gains `wall_s` (unless `fn` measured it) and is written atomically, so a killed
    run leaves no record and is redone. Prints `label: name done (... s)` and `summary(rec)`."""
    from moe.io.checkpoint import write_json

    f = out / "runs" / f"{name}.json"
    if f.is_file():
        return json.loads(f.read_text())
    f.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rec = fn()
    rec.setdefault("wall_s", time.time() - t0)
    write_json(f, rec)
    extra = f": {summary(rec)}" if summary else ""
    print(f"{label}: {name} done{extra} ({rec['wall_s']:.1f} s)", flush=True)
    return rec


def recipe_changed(saved: Path, recipe: Recipe, ignore: tuple[str, ...] = ()) -> bool:
    """Whether a run directory's recorded recipe differs from `recipe` in anything that changes
    results: where it runs, its name, progress bars and the dotted keys in `ignore` do not."""
    from omegaconf import OmegaConf

    old = _flat(OmegaConf.to_container(OmegaConf.load(saved), resolve=False))
    new = _flat(to_dict(recipe))
    for d in (old, new):
        for key in [*d]:
            if key.split(".")[0] in ("overwrite", "resume", "out_dir", "name", "sweep") or key in (
                "trainer.enable_progress_bar", *ignore
            ) or any(key.startswith(f"{i}.") for i in ignore):
                d.pop(key)
    # a field added to the schema since the run was recorded, at its default, changes nothing
    default = _flat(to_dict(Recipe()))
    for k in set(new) - set(old):
        if k in default and _same(new[k], default[k]):
            new.pop(k)
    return not _same(old, new)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)

