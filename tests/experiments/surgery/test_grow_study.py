"""The surgery measurements (moe/experiments/surgery/study.py) end to end at toy size: reports,
resumption, and the growth methods' exactness as the study applies them."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO

from moe.config import ConfigError, load_recipe
from moe.experiments import experiment_of
from moe.experiments.surgery.study import grow_to, small_config
from moe.model.transformer import Transformer

TINY = ["data.bytes_per_domain=30000", "surgery.eval_batches=1", "surgery.seeds=2",
        "eval.batch_size=4", "data.batch_size=4"]  # fmt: skip


def recipe(kind: str, tmp_path, *over: str):
    return load_recipe(REPO / "recipes" / "surgery" / f"{kind}.yaml",
                       [f"out_dir={tmp_path / kind}", *TINY, *over])  # fmt: skip


@pytest.mark.parametrize("method", ["zero+identity", "split+identity", "zero+stack"])
def test_growth_methods_as_the_study_grows(tmp_path, method):
    r = recipe("growth", tmp_path)
    small, big = small_config(r)
    torch.manual_seed(0)
    m = Transformer.from_state(small, _random(small))
    cfg, sd = grow_to(small, m.state_dict(), big, method, 0.01, 0)
    shape = (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.ffn_dim)
    assert shape == (big.dim, big.n_layers, big.n_heads, big.ffn_dim)
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(1))
    grown = Transformer.from_state(cfg, sd).eval()
    with torch.no_grad():
        diff = (grown(ids).logits - m.eval()(ids).logits).abs().max()
    assert (diff < 1e-5) == (not method.endswith("stack"))  # stacking is not exact


def _random(cfg):
    from moe.model.transformer import Transformer

    sd = Transformer(cfg).state_dict()
    return {k: v + 0.1 * torch.randn_like(v) for k, v in sd.items()}


def test_growth_and_depth_probe_run_report_and_resume(tmp_path):
    r = recipe("growth", tmp_path, "surgery.steps=4", "surgery.small_steps=2",
               "surgery.eval_every=2", "surgery.methods=[zero+identity,split+stack]")  # fmt: skip
    exp = experiment_of(r)
    assert exp.section == "surgery" and r.name in exp.plan(r, None)
    report = exp.run(r, None, "growth.yaml")
    res = json.loads((report.parent / "results.json").read_text())
    rows = res["summary"]["methods"]["zero+identity"]["rows"]
    assert all(abs(x["start"] - x["small"]) < 1e-4 for x in rows)  # exact growth
    assert (report.parent / "plots" / "growth_bpb_vs_flops.png").is_file()
    before = (report.parent / "runs" / "scratch-seed1234.json").read_text()
    exp.run(r, None, "growth.yaml")  # resumes: every run read back, nothing retrained
    assert (report.parent / "runs" / "scratch-seed1234.json").read_text() == before

    p = recipe("depth_probe", tmp_path, "surgery.steps=3", "model.n_layers=3")
    report = experiment_of(p).run(p, None, "depth_probe.yaml")
    res = json.loads((report.parent / "results.json").read_text())
    assert len(res["summary"]["layers"]) == 3
    assert "cheapest layer to delete" in report.read_text()


@pytest.mark.parametrize(
    "over,msg",
    [
        (["surgery.methods=[zero+magic]"], "is not WIDTH"),
        (["surgery.small.dim=128"], "larger than"),
        (["surgery.small.n_heads=4", "surgery.small.n_kv_heads=4"], "head size"),
        (["surgery.small.n_layers=3", "model.n_layers=4"], "not a multiple"),
        (["surgery.small.depth=3"], "not one of"),
        (["surgery.kind=surgery"], "choose one of"),
    ],
)
def test_growth_recipe_mistakes(tmp_path, over, msg):
    r = recipe("growth", tmp_path, *over)
    with pytest.raises(ConfigError, match=msg):
        experiment_of(r).plan(r, None)
    assert not (tmp_path / "growth").exists()
