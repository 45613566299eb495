"""The pruning measurements (`moe run` with a `prune:` section), at toy sizes."""

from __future__ import annotations

import json

import pytest
from helpers import REPO

from moe.config import ConfigError, load_recipe
from moe.experiments import experiment_of

SMALL = ["data.bytes_per_domain=60000", "prune.seeds=2", "prune.calib_batches=1",
         "prune.eval_batches=1", "data.batch_size=4", "eval.batch_size=4"]  # fmt: skip


def test_curves_run_report_and_resume(tmp_path):
    r = load_recipe(REPO / "recipes/prune/curves.yaml", [
        f"out_dir={tmp_path}", *SMALL, "prune.train_steps=3", "prune.units=[ffn,layers]",
        "prune.methods=[taylor,random]", "prune.fractions=[0.5]", "prune.heal_steps=2",
        "prune.heal_fractions=[0.5]", "model.n_layers=2"])  # fmt: skip
    exp = experiment_of(r)
    assert exp is not None and exp.section == "prune"
    report = exp.run(r, None, "curves.yaml")
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["kind"] == "curves" and res["seeds"] == [1234, 1235]
    keys = set(res["points"])
    assert "ffn|taylor|text|0.5000|0" in keys and "ffn|taylor|text|0.5000|1" in keys
    assert "layers|random|all|0.5000|0" in keys
    assert set(res["matrices"]["ffn|taylor"]["matrix"]) == {"text", "code", "dna", "all"}
    for pair in res["jaccard"]["ffn.taylor"].values():
        assert 0.0 <= pair["mean"] <= 1.0
    text = report.read_text()
    assert "Removable fraction" in text and (tmp_path / "plots" / "curves.png").is_file()
    # a second run reads the per-seed JSON instead of training again
    before = {p: p.stat().st_mtime for p in (tmp_path / "runs").iterdir()}
    exp.run(r, None, "curves.yaml")
    assert {p: p.stat().st_mtime for p in (tmp_path / "runs").iterdir()} == before


def test_compress_run_and_pareto(tmp_path):
    r = load_recipe(REPO / "recipes/prune/compress.yaml", [
        f"out_dir={tmp_path}", *SMALL, "prune.sizes=[16x1x2x32,32x2x2x64]",
        "prune.budget_steps=2", "prune.levels=[fp16,int4,ffn0.5+int8]"])  # fmt: skip
    res_path = experiment_of(r).run(r, 1, None)
    res = json.loads((tmp_path / "results.json").read_text())
    b = res["budget"]
    assert b["largest"] == "32x2x2x64" and b["steps"]["32x2x2x64"] == 2
    assert b["steps"]["16x1x2x32"] > 2  # the smaller model trains more steps for the FLOPs
    t = res["table"]
    assert t["32x2x2x64|int4"]["bytes"] < t["32x2x2x64|fp16"]["bytes"] / 3
    assert res["frontier"] and all(k in t for k in res["frontier"])
    assert "Does a compressed larger model beat" in res_path.read_text()


@pytest.mark.parametrize("ov, msg", [
    (["prune.kind=shrink"], "prune.kind"),
    (["prune.kind=compress", "prune.sizes=[32x2,16x1x2x32]", "prune.levels=[fp16]"],
     "DIMxLAYERSxHEADSxFFN"),
    (["prune.kind=compress", "prune.sizes=[16x1x2x32,32x1x2x64]", "prune.levels=[int3]"],
     "int3"),
    (["prune.kind=curves", "prune.units=[channels]"], "prune.units"),
    (["prune.kind=curves", "prune.fractions=[1.0]"], "fraction"),
])
def test_bad_prune_sections(ov, msg, tmp_path):
    r = load_recipe(REPO / "recipes/prune/curves.yaml", [f"out_dir={tmp_path}", *ov])
    with pytest.raises(ConfigError, match=msg):
        experiment_of(r).plan(r, None)
    assert not any(tmp_path.iterdir())
