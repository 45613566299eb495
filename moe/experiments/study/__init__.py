"""The experiment runner: `moe run` (one study, any number of seeds) and `moe sweep`.

- `runner.Study`: one study in one run directory, stages ordered from the arms' declarations;
- `arms/`: the registry of study arms (one module per arm);
- `budget`: how the compute budget is shared between stages;
- `records`: typed results shared with the report;
- `sweep`: one study per value of a recipe key, one report across them.

Importing this package is cheap (the experiment and arm registries import it to find their
members); the runner and what it needs load with the first call.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe.config import ConfigError, Recipe, to_yaml
from moe.experiments import recipe_changed

if TYPE_CHECKING:
    from moe.experiments.study.runner import Study

__all__ = ["Study", "run_study", "dry_run"]


def __getattr__(name: str) -> Any:
    if name == "Study":
        from moe.experiments.study.runner import Study

        return Study
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dry_run(recipe: Recipe, only: str | None = None, seeds: int | None = None) -> str:
    """The stage plan of a study (and every seed's), without training anything, after every
    check the real run makes before it writes anything (`check_study`)."""
    return check_study(recipe, only, seeds).describe_plan()


def check_study(recipe: Recipe, only: str | None = None, seeds: int | None = None) -> Study:
    """Every mistake `run_study` refuses before it writes anything: seeds, --stage, the budget
    and plan, a model too large to train here (the seed's; with init= its stage checks)."""
    from moe.experiments.study.runner import Study
    from moe.train.stages import check_fits

    seeds = recipe.study.seeds if seeds is None else seeds
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if only is not None and seeds > 1:
        raise ConfigError("--stage runs one stage of one study; drop --seeds")
    study = Study(recipe, Path(recipe.out_dir))
    study.check_stage(only)
    if recipe.init is None:
        check_fits(recipe, recipe.model, "model")
    return study


def check_jobs(jobs: int, only: str | None = None) -> None:
    """`--jobs N`: at least 1; --stage runs one stage, in this process."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if only is not None and jobs > 1:
        raise ConfigError("--stage runs one stage in this process; drop --jobs")


def run_study(
    recipe: Recipe, only: str | None = None, seeds: int | None = None,
    recipe_path: str | None = None, jobs: int = 1,
) -> Path:
    """Run (or resume) the study; with seeds > 1 it is repeated with seeds seed, seed+1, ...

    and the report gives every number as mean ± 95% CI with paired differences per seed.

    `jobs` > 1 (`--jobs N`) runs independent work in up to N spawned processes, sharing the CPU
    threads (moe/experiments/study/parallel.py): with seeds > 1 the seeds' studies, each written
    as without it and aggregated in seed order (the same results); with one seed the training
    stages whose dependencies are built, then evaluation and the report here. Each worker's lines
    are prefixed with its seed or stage; a Ctrl-C stops every worker at a resumable point.
    """
    from moe.experiments.study.context import log
    from moe.experiments.study.runner import Study
    from moe.io.checkpoint import atomic_write_text, write_json
    from moe.io.output import claim, recipe_inputs

    seeds = recipe.study.seeds if seeds is None else seeds
    run_dir = Path(recipe.out_dir)
    check_jobs(jobs, only)
    check_study(recipe, only, seeds)  # before anything is written
    with claim(run_dir, recipe_inputs(recipe)):  # before anything in it is touched
        run_dir.mkdir(parents=True, exist_ok=True)
        saved = run_dir / "recipe.yaml"
        if saved.is_file() and not recipe.overwrite and _study_changed(saved, recipe):
            raise ConfigError(
                f"{run_dir} holds a study with a different recipe; pass --overwrite to replace "
                "it or choose another out_dir"
            )
        if recipe.overwrite and only is None:
            for old in [run_dir / "stages", *run_dir.glob("seed-*")]:
                shutil.rmtree(old, ignore_errors=True)
        atomic_write_text(saved, to_yaml(recipe))
        cmd = f"moe run {recipe_path}" if recipe_path else "moe run"
        from moe.experiments.study.report import aggregate, write_aggregate_report, write_report

        if seeds == 1:
            if jobs > 1 and only is None:
                from moe.experiments.study.parallel import run_stages

                run_stages(recipe, run_dir, jobs)  # then evaluation and the report, here
            res = Study(recipe, run_dir).run(only)
            if res:
                res["command"] = cmd
                write_json(run_dir / "results.json", res)
                path = write_report(res, run_dir)
                log(f"wrote {path}")
            return run_dir / "report.md"
        all_res = []
        subs = [dataclasses.replace(recipe, seed=recipe.seed + k,
                                    out_dir=str(run_dir / f"seed-{recipe.seed + k}"))
                for k in range(seeds)]  # fmt: skip
        if jobs > 1:
            from moe.experiments.study.parallel import run_seeds

            for sub in subs:
                Path(sub.out_dir).mkdir(parents=True, exist_ok=True)
            all_res = run_seeds(subs, f"{cmd} --seeds {seeds}", jobs, run_dir)
        for k, sub in enumerate(subs if jobs == 1 else []):
            log(f"== seed {k + 1}/{seeds} ({sub.out_dir})")
            Path(sub.out_dir).mkdir(parents=True, exist_ok=True)
            res = Study(sub, Path(sub.out_dir)).run()
            res["command"] = f"{cmd} --seeds {seeds}"
            write_json(Path(sub.out_dir) / "results.json", res)
            all_res.append(res)
        agg = aggregate(all_res)
        write_json(run_dir / "results.json", agg)
        path = write_aggregate_report(agg, run_dir)
        log(f"wrote {path}")
        return path


def _study_changed(saved: Path, recipe: Recipe) -> bool:
    """Whether a run directory's recorded recipe differs in anything that changes results: more
    seeds extend a study (finished ones stay); more held-out sets or another evaluation protocol
    re-evaluate, not retrain (evaluations are cached by their settings)."""
    return recipe_changed(saved, recipe, ignore=("study.seeds", "study.eval_data",
                                                 "study.eval_protocol", "study.eval_context",
                                                 "study.eval_batches",
                                                 "study.equivalence_margin",
                                                 "study.bootstrap_iters"))  # fmt: skip
