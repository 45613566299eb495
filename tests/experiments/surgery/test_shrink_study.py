"""The shrink measurement (moe/experiments/surgery/shrink.py) at toy size: cuts, healing, report."""

from __future__ import annotations

import json

import pytest
from helpers import REPO

from moe.config import ConfigError, load_recipe
from moe.experiments import experiment_of

TINY = ["data.bytes_per_domain=30000", "surgery.eval_batches=1", "surgery.seeds=2",
        "eval.batch_size=4", "data.batch_size=4", "surgery.steps=4", "surgery.heal_steps=2",
        "surgery.fractions=[0.5]", "model.n_layers=3"]  # fmt: skip


def test_shrink_study_runs_and_reports(tmp_path):
    r = load_recipe(REPO / "recipes/surgery/shrink.yaml", [f"out_dir={tmp_path}/s", *TINY])
    report = experiment_of(r).run(r, None, "shrink.yaml")
    res = json.loads((report.parent / "results.json").read_text())
    cuts = res["runs"]["1234"]["cuts"]
    assert set(cuts) == {"layers:0.5", "ffn:0.5", "heads:0.5"}
    assert cuts["layers:0.5"]["removed"]["layers_removed"]  # by Block Influence
    assert len(cuts["layers:0.5"]["removed"]["block_influence"]) == 3
    assert 0 < cuts["ffn:0.5"]["params_fraction"] < 1
    assert "healed" in report.read_text() and (report.parent / "plots" / "shrink.png").is_file()


@pytest.mark.parametrize("over,msg", [(["surgery.axes=[depth]"], "not one"),
                                      (["surgery.fractions=[1.0]"], "in \\(0, 1\\)"),
                                      (["surgery.heal_steps=0"], "heal_steps")])  # fmt: skip
def test_shrink_study_bad_recipe(tmp_path, over, msg):
    r = load_recipe(REPO / "recipes/surgery/shrink.yaml", [f"out_dir={tmp_path}/s", *over])
    with pytest.raises(ConfigError, match=msg):
        experiment_of(r).plan(r, None)
