"""`moe run` of the delta experiments on a tiny budget: both kinds write a report and resume
from their per-run JSON; recipe errors are caught before anything is written."""

import json

import pytest
from helpers import REPO

from moe.config import ConfigError, load_recipe
from moe.experiments import experiment_of
from moe.experiments.fleet import study

TINY = ["fleet.base_steps=4", "fleet.steps=4", "fleet.seeds=2", "fleet.eval_batches=1",
        "fleet.eval_every=2", "data.bytes_per_domain=30000", "data.seq_len=32",
        "data.batch_size=2", "model.max_seq_len=32"]  # fmt: skip


def _recipe(name, tmp_path, extra=()):
    return load_recipe(REPO / "recipes" / "fleet" / name,
                       TINY + [f"out_dir={tmp_path / 'run'}"] + list(extra))


def test_sizes_runs_reports_and_resumes(tmp_path):
    r = _recipe("sizes.yaml", tmp_path, ["fleet.methods=[int8,topk:0.5]",
                                         "fleet.domains=[text]"])
    assert experiment_of(r).section == "fleet"
    rep = study.run(r, None, "recipes/fleet/sizes.yaml")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    rows = {x["method"]: x for x in res["domains"]["text"]["rows"]}
    assert set(rows) == {"lossless", "int8", "topk:0.5"}
    f = tmp_path / "run" / "deltas" / "text-seed1234" / "int8.delta.safetensors"
    assert rows["int8"]["bytes"]["n"] == 2 and f.stat().st_size in (
        json.loads((tmp_path / "run" / "runs" / "sizes-text-seed1234.json").read_text())
        ["rows"][1]["bytes"],)  # fmt: skip
    assert "Smallest delta" in rep.read_text()
    mtime = (tmp_path / "run" / "runs" / "sizes-text-seed1234.json").stat().st_mtime_ns
    study.run(r, None, None)  # resumes: the finished runs are read back, not redone
    assert (tmp_path / "run" / "runs" / "sizes-text-seed1234.json").stat().st_mtime_ns == mtime


def test_fleet_runs_and_reports(tmp_path):
    r = _recipe("fleet.yaml", tmp_path, ['fleet.arms=[sync,"H=2 c=int8","H=4 S=1"]'])
    rep = study.run(r, 1, None)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [x["arm"] for x in res["rows"]] == ["sync", "H=2 c=int8", "H=4 S=1"]
    assert "vs_sync" in res["rows"][1] and res["frontier"]
    assert not list((tmp_path / "run" / "state").glob("*.pt"))  # states removed when done
    assert "frontier" in rep.read_text()


@pytest.mark.parametrize("extra,msg", [
    (["fleet.replicas=0"], "replicas must be >= 1"),
    (['fleet.arms=["H=0"]'], "H \\(local steps per round\\) must be >= 1"),
    (['fleet.arms=["R=0"]'], "R \\(replicas\\) must be >= 1"),
    (['fleet.arms=["H=3"]'], "multiple of H"),
    (["fleet.kind=zip"], "fleet.kind"),
    (["fleet.domains=[klingon]"], "not in data.domains"),
])  # fmt: skip
def test_bad_fleet_recipes_write_nothing(tmp_path, extra, msg):
    r = _recipe("fleet.yaml", tmp_path, extra)
    with pytest.raises(ConfigError, match=msg):
        study.plan(r, None)
    with pytest.raises(ConfigError, match=msg):
        study.run(r, None, None)
    assert not (tmp_path / "run").exists()


def test_bad_sizes_methods(tmp_path):
    r = _recipe("sizes.yaml", tmp_path, ["fleet.methods=[topk:2]"])
    with pytest.raises(ConfigError, match="density must be in"):
        study.run(r, None, None)
    assert not (tmp_path / "run").exists()
