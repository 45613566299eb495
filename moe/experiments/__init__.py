"""Experiments that `moe run` runs besides the branch-train-mix study (moe/experiments/study/).

Each is switched on by its own recipe section (`init_study:`, ...) and implemented in its own
package: its `__init__.py` registers an `Experiment` in `EXPERIMENTS` (every package here is
imported the first time the registry is read), and its module defines two functions:
`plan(recipe, seeds) -> str` (what `--dry-run` prints) and `run(recipe, seeds, recipe_path) ->
Path` (the report it writes). A recipe switches on at most one. A new experiment is one new
package here and its section in moe/config/.
"""

from moe.experiments.common import cached_run, experiment_dir, recipe_changed
from moe.experiments.registry import EXPERIMENTS, Experiment, experiment_of, register

__all__ = ["EXPERIMENTS", "Experiment", "cached_run", "experiment_dir", "experiment_of",
           "recipe_changed", "register"]
