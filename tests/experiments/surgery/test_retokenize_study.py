"""The retokenize measurement (moe/experiments/surgery/retokenize.py) at toy size."""

from __future__ import annotations

import json

import pytest
from helpers import REPO

from moe.config import ConfigError, load_recipe
from moe.experiments import experiment_of

TINY = ["data.bytes_per_domain=30000", "surgery.eval_batches=1", "surgery.seeds=2",
        "eval.batch_size=4", "data.batch_size=4", "surgery.steps=4", "surgery.retok_steps=3",
        "surgery.eval_every=3", "surgery.vocab_size=300", "model.n_layers=1"]  # fmt: skip


def test_retokenize_study_runs_and_reports(tmp_path):
    r = load_recipe(REPO / "recipes/surgery/retokenize.yaml", [f"out_dir={tmp_path}/r", *TINY])
    report = experiment_of(r).run(r, None, "retokenize.yaml")
    res = json.loads((report.parent / "results.json").read_text())
    runs = res["runs"]
    assert set(runs) == {"mean", "mean+frozen", "random", "random+frozen", "scratch"}
    # the same initial model for both mean arms (the frozen one differs only in training)
    assert runs["mean"]["1234"]["bpb"][0] == runs["mean+frozen"]["1234"]["bpb"][0]
    # mean-of-bytes embeddings start better than random ones on the same body
    assert runs["mean"]["1234"]["bpb"][0]["mean"] < runs["random"]["1234"]["bpb"][0]["mean"]
    assert (report.parent / "tokenizer" / "tokenizer.json").is_file()
    assert (report.parent / "plots" / "retokenize.png").is_file()


@pytest.mark.parametrize("over,msg", [(["surgery.arms=[mean+warm]"], "not one"),
                                      (["surgery.vocab_size=100"], "vocab_size"),
                                      (["model.vocab_size=300"], "byte-level model")])  # fmt: skip
def test_retokenize_study_bad_recipe(tmp_path, over, msg):
    r = load_recipe(REPO / "recipes/surgery/retokenize.yaml", [f"out_dir={tmp_path}/r", *over])
    with pytest.raises(ConfigError, match=msg):
        experiment_of(r).plan(r, None)
