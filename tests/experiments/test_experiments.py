"""`moe run` of an experiment (moe/experiments/): its run directory is locked, refuses the runs
of another recipe, keeps them when only the seeds change, and --overwrite empties it."""

import pytest
from helpers import REPO

from moe.cli import main
from moe.config import ConfigError, load_recipe
from moe.experiments import experiment_dir, recipe_changed

INIT_DEBUG = REPO / "recipes" / "init" / "debug.yaml"


def test_a_changed_recipe_is_refused_and_more_seeds_are_not(tmp_path):
    r = load_recipe(INIT_DEBUG, [f"out_dir={tmp_path}"])
    experiment_dir(r, "init_study")
    saved = tmp_path / "recipe.yaml"
    assert not recipe_changed(saved, r)
    more_seeds = load_recipe(INIT_DEBUG, [f"out_dir={tmp_path}", "init_study.seeds=5"])
    assert recipe_changed(saved, more_seeds)
    assert not recipe_changed(saved, more_seeds, ignore=("init_study.seeds",))
    experiment_dir(more_seeds, "init_study")  # extends the experiment
    other = load_recipe(INIT_DEBUG, [f"out_dir={tmp_path}", "init_study.steps=7"])
    with pytest.raises(ConfigError, match="of a different recipe"):
        experiment_dir(other, "init_study")
    # where it runs, its name and progress bars change no result
    moved = load_recipe(INIT_DEBUG, [f"out_dir={tmp_path}/x", "name=renamed",
                                     "trainer.enable_progress_bar=false", "init_study.seeds=5"])
    assert not recipe_changed(saved, moved)


def test_overwrite_empties_the_directory_but_keeps_the_lock(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "old.json").write_text("{}")
    (tmp_path / ".lock").write_text("")
    r = load_recipe(INIT_DEBUG, [f"out_dir={tmp_path}", "overwrite=true"])
    experiment_dir(r, "init_study")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "recipe.yaml"]


def test_moe_run_refuses_another_recipes_directory_and_writes_nothing(tmp_path):
    out = tmp_path / "init"
    assert main(["run", str(INIT_DEBUG), f"out_dir={out}", "init_study.seeds=1"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["run", str(INIT_DEBUG), f"out_dir={out}", "init_study.seeds=1",
                 "init_study.steps=7"]) == 2
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_an_experiments_extendable_keys_add_runs(tmp_path):
    """More arms of an init study add runs (each cached by name): the directory is extended."""
    from moe.experiments import EXPERIMENTS

    ext = EXPERIMENTS["init_study"].extends
    r = load_recipe(INIT_DEBUG, [f"out_dir={tmp_path}"])
    experiment_dir(r, "init_study", ext)
    more = load_recipe(INIT_DEBUG, [f"out_dir={tmp_path}",
                                    f"init_study.arms=[{','.join(r.init_study.arms)},gaussian]"])
    experiment_dir(more, "init_study", ext)
    with pytest.raises(ConfigError, match="of a different recipe"):
        experiment_dir(r, "init_study")  # the arms differ again; without the extension: refused


def test_cached_run_computes_once_and_a_failed_run_leaves_no_record(tmp_path, capsys):
    from moe.experiments import cached_run

    calls = []

    def fn():
        calls.append(1)
        return {"bpb": 1.5}

    rec = cached_run(tmp_path, "a-seed0", fn, "demo", lambda r: f"bpb {r['bpb']}")
    assert rec["bpb"] == 1.5 and rec["wall_s"] >= 0 and calls == [1]
    assert "demo: a-seed0 done: bpb 1.5 (" in capsys.readouterr().out
    assert cached_run(tmp_path, "a-seed0", fn, "demo") == rec and calls == [1]  # read back
    # a record that measured its own wall time keeps it
    assert cached_run(tmp_path, "b", lambda: {"wall_s": 7.0}, "demo")["wall_s"] == 7.0

    def boom():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached_run(tmp_path, "c", boom, "demo")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["a-seed0.json", "b.json"]
