"""Every recipe shipped in recipes/ loads and validates (merge configs by their own schema)."""

from pathlib import Path

import pytest
from helpers import REPO

from moe.config import load_recipe
from moe.model.flops import count_params

RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "merge" not in p.parts)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_recipe_validates(path: Path):
    r = load_recipe(path)
    assert count_params(r.model).total > 0
    if r.init is None:  # with init=, the model (and its context) is the checkpoint's
        assert r.data.seq_len <= r.model.resolved().max_seq_len


def test_there_are_recipes_of_each_kind():
    names = {str(p.relative_to(REPO / "recipes")) for p in RECIPES}
    for want in ("debug/dense.yaml", "debug/branch.yaml", "debug/joint.yaml", "debug/router.yaml",
                 "quickstart.yaml", "small/study.yaml", "cluster/branch.yaml"):
        assert want in names


STUDIES = [p for p in RECIPES if p.parent.name != "cluster"
           and (p.stem in ("quickstart", "study", "sweep") or p.parent.name == "ablations")]


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: str(p.relative_to(REPO)))
def test_study_recipe_plans(path: Path):
    """Dry-run every shipped study and sweep: the budget splits and every stage's dependencies
    are built by an earlier stage of the chosen arms."""
    from moe.experiments.study.runner import Study
    from moe.experiments.study.sweep import Sweep

    r = load_recipe(path)
    studies = ([Study(x, Path(x.out_dir)) for x in Sweep(str(path), []).recipes]
               if r.sweep.key else [Study(r, Path(r.out_dir))])
    for st in studies:
        plan = st.plan()
        seen: set[str] = set()
        for stage in plan:
            assert set(stage.deps) <= seen, (stage.name, stage.deps)
            seen.add(stage.name)
        b = st.ctx.budget
        # the experts' post-seed FLOPs match the monolith's to within one MoE step
        assert abs(b.expert_flops_after_seed - b.monolith_flops_after_seed) <= (
            b.moe_flops_per_step + b.dense_flops_per_step)
        for m in st.model_specs():
            assert set(m.lineage) | set(m.members) <= seen, m.name


def test_reference_recipes_follow_the_issue():
    study = load_recipe(REPO / "recipes" / "study.yaml")
    assert study.study.protocol == "fork" and study.study.seeds >= 3
    assert study.data.bytes_per_domain >= 1_000_000
    sweep = load_recipe(REPO / "recipes" / "sweep.yaml")
    # the sweep grows the model with the budget: each value sets the budget and the size
    assert sweep.sweep.key == "."
    vals = [float(v["study.budget_flops"]) for v in sweep.sweep.values]
    dims = [int(v["model.dim"]) for v in sweep.sweep.values]
    assert len(vals) >= 4 and max(vals) / min(vals) >= 10 and sweep.study.seeds >= 3
    assert dims == sorted(dims) and dims[0] < dims[-1]



def _experiment(path: Path):
    from moe.experiments import experiment_of

    return experiment_of(load_recipe(path))


EXPERIMENT_RECIPES = [p for p in RECIPES if p not in STUDIES and _experiment(p) is not None]


@pytest.mark.parametrize("path", EXPERIMENT_RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_experiment_recipe_plans(path: Path):
    """Every shipped experiment recipe (init study, surgery, pruning, fleet...) dry-runs."""
    r = load_recipe(path)
    assert r.name in _experiment(path).plan(r, None)


def test_a_recipe_runs_one_experiment(monkeypatch):
    import moe.experiments as ex
    from moe.config import ConfigError

    assert ex.experiment_of(load_recipe(None)) is None  # no section switched on: the study
    r = load_recipe(REPO / "recipes" / "init" / "study.yaml")
    assert ex.experiment_of(r).section == "init_study"
    other = ex.Experiment("other", lambda r: True, "moe.experiments.init.study", "always on")
    monkeypatch.setitem(ex.EXPERIMENTS, "other", other)
    with pytest.raises(ConfigError, match="runs one"):
        ex.experiment_of(r)
