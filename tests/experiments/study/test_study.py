"""`moe run` on the debug study: the report's numbers are the checkpoints' numbers."""

import json
import re

import numpy as np
import pytest
from helpers import DEBUG

from moe.cli import main
from moe.eval.evaluate import evaluate_checkpoint
from moe.io.checkpoint import read_meta

pytestmark = pytest.mark.slow

QUIET = ["trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "run"
    assert main(["run", str(DEBUG / "study.yaml"), f"out_dir={out}", *QUIET]) == 0
    return out


def test_study_writes_report_results_and_plots(study):
    assert (study / "report.md").is_file()
    res = json.loads((study / "results.json").read_text())
    for name in ("seed", "branch-text", "branch-code", "branch-dna", "ft-code-1", "ft-code-2",
                 "merge-code", "btx", "moe", "dense-compute", "dense-data", "btm", "avg",
                 "random-btm"):
        assert name in res["models"], name
    assert list((study / "plots").glob("*.png"))


def test_results_match_independent_reevaluation(study):
    res = json.loads((study / "results.json").read_text())
    for name, m in res["models"].items():
        if m["checkpoint"] is None:
            continue
        rep = evaluate_checkpoint(study / m["checkpoint"], ["text", "code", "dna"],
                                  batch_size=8, progress=False)  # moe eval's default protocol
        for dom, v in rep["domains"].items():
            assert m["eval"][dom]["bpb"] == pytest.approx(v["bpb"], rel=1e-6), (name, dom)
            assert m["eval"][dom]["per_document"] == v["per_document"] or (
                np.allclose(m["eval"][dom]["per_document"]["nats"], v["per_document"]["nats"],
                            rtol=1e-6))
    assert res["eval_protocol"]["kind"] == "rolling"
    assert res["eval_protocol"]["context"] == rep["protocol"]["context"]
    assert "- evaluation: rolling log-likelihood" in (study / "report.md").read_text()


def test_compute_matched_baseline_has_the_experts_flops(study):
    res = json.loads((study / "results.json").read_text())
    moe, dense = res["models"]["moe"], res["models"]["dense-compute"]
    # matched to within one training step of the dense model
    step = res["stages"][0]["flops"] / res["stages"][0]["steps"]
    assert abs(moe["train_flops"] - dense["train_flops"]) <= step
    ledger = {s["name"]: s for s in res["stages"]}
    after_seed = sum(ledger[n]["flops"] for n in ledger
                     if n.startswith(("branch-", "ft-")) or n == "moe")
    assert moe["train_flops"] == pytest.approx(ledger["seed"]["flops"] + after_seed)
    # the monolith is the seed run continued: its stage starts at the seed's last step
    total = res["budget"]["total_steps"]
    assert ledger["dense-compute"]["steps"] == total - ledger["seed"]["steps"]
    # the in-domain tokens of a branch's lineage: the seed's share plus all of its own
    seed_code = ledger["seed"]["tokens_by_domain"]["code"]
    assert res["models"]["branch-code"]["tokens_by_domain"]["code"] == (
        seed_code + ledger["branch-code"]["tokens"])
    assert res["models"]["branch-code"]["tokens_by_domain"]["text"] == (
        ledger["seed"]["tokens_by_domain"]["text"])


def test_random_split_control_is_wired_like_the_branches(study):
    res = json.loads((study / "results.json").read_text())
    ledger = {s["name"]: s for s in res["stages"]}
    for k in range(3):
        ctl = ledger[f"random-{k}"]
        assert ctl["steps"] == ledger["branch-text"]["steps"]
        # trained on the mixed stream: every domain, not one
        assert set(ctl["tokens_by_domain"]) == {"text", "code", "dna"}
    orders = {json.dumps(ledger[f"random-{k}"]["tokens_by_domain"]) for k in range(3)}
    assert len(orders) == 3  # each control branch has its own data order
    rnd, btm = res["models"]["random-btm"], res["models"]["btm"]
    assert rnd["train_flops"] == pytest.approx(btm["train_flops"])
    assert rnd["total_params"] == btm["total_params"]


def test_report_table_shows_the_results_numbers(study):
    res = json.loads((study / "results.json").read_text())
    text = (study / "report.md").read_text()
    bpb = res["models"]["dense-compute"]["eval"]["code"]["bpb"]
    assert re.search(rf"\*?\*?{bpb:.3f}", text), "compute-matched code bpb missing from report"


def test_rerun_keeps_finished_stages_and_stage_reruns_one(study):
    before = {p.parent.name: read_meta(p)["id"] for p in (study / "stages").glob("*/model")}
    assert main(["run", str(DEBUG / "study.yaml"), f"out_dir={study}", *QUIET]) == 0
    again = {p.parent.name: read_meta(p)["id"] for p in (study / "stages").glob("*/model")}
    assert again == before
    # a re-run that trains nothing still reports what the study cost: its stages' wall times
    res = json.loads((study / "results.json").read_text())
    assert res["wall_s"] >= sum(s["wall_s"] for s in res["stages"]) - 0.1 > 0
    assert main(["run", str(DEBUG / "study.yaml"), f"out_dir={study}", "--stage", "branch-dna",
                 *QUIET]) == 0
    after = {p.parent.name: read_meta(p)["id"] for p in (study / "stages").glob("*/model")}
    assert after["branch-dna"] != before["branch-dna"]
    assert {k: v for k, v in after.items() if k != "branch-dna"} == {
        k: v for k, v in before.items() if k != "branch-dna"}


def test_changed_recipe_is_refused(study):
    rc = main(["run", str(DEBUG / "study.yaml"), f"out_dir={study}", "study.budget_steps=81",
               *QUIET])
    assert rc == 2


def test_seeds_repeat_the_study_and_report_mean_and_spread(tmp_path):
    out = tmp_path / "multi"
    assert main(["run", str(DEBUG / "study.yaml"), f"out_dir={out}", "--seeds", "2",
                 "study.budget_steps=30", "study.finetune_steps=2",
                 "study.arms=[seed,branches,family,btx,monolith]", "study.eval_batches=1",
                 *QUIET]) == 0
    agg = json.loads((out / "results.json").read_text())
    assert agg["n"] == 2
    per_seed = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (1234, 1235)]
    a, b = (r["models"]["moe"]["eval"]["code"]["bpb"] for r in per_seed)
    assert a != b
    stats = agg["models"]["moe"]["bpb"]["code"]
    assert stats["n"] == 2 and stats["mean"] == pytest.approx((a + b) / 2)
    assert "±" in (out / "report.md").read_text()


def test_eval_data_sets_join_every_models_results(tmp_path):
    """study.eval_data: each model (checkpoints and the BTM ensemble) is evaluated on the extra
    set; a checkpoint's numbers equal `moe eval --data` on it, and both reports show the set."""
    from moe.eval.data_spec import parse_data_spec

    poems = tmp_path / "poems.txt"
    poems.write_text("\n\n".join(f"Stanza {i}: the sea, the sky and the long grey road home."
                                 for i in range(40)))
    out = tmp_path / "sets"
    spec = f"poems={poems}"
    assert main(["run", str(DEBUG / "study.yaml"), f"out_dir={out}", "--seeds", "2",
                 "study.budget_steps=20", "study.arms=[seed,branches,btm,monolith]",
                 "study.eval_batches=1", f"study.eval_data=[{spec}]", *QUIET]) == 0
    res = json.loads((out / "seed-1234" / "results.json").read_text())
    assert res["eval_sets"] == ["poems"]
    for name, m in res["models"].items():
        assert m["eval_sets"]["poems"]["bpb"] > 0, name
        if m["checkpoint"] is None:
            continue
        rep = evaluate_checkpoint(out / "seed-1234" / m["checkpoint"], ["poems"],
                                  batch_size=8, progress=False, data=parse_data_spec([spec]))
        assert m["eval_sets"]["poems"]["bpb"] == pytest.approx(rep["domains"]["poems"]["bpb"],
                                                               rel=1e-6), name
    from moe.experiments.study.report import render_report

    one = render_report(res)  # the single-seed report of the same results
    assert "## Other held-out sets" in one and f"`{spec}`" in one
    agg = json.loads((out / "results.json").read_text())
    assert agg["eval_sets"]["models"]["btm"]["bpb"]["poems"]["n"] == 2
    text = (out / "report.md").read_text()
    assert "## Other held-out sets" in text and "poems" in text


@pytest.mark.parametrize("over", [["study.eval_protocol=chunks", "study.eval_batches=2"],
                                  ["study.eval_context=16"]])
def test_eval_protocol_and_context_are_the_studys_choice(tmp_path, over):
    """study.eval_protocol=chunks scores as `moe eval`'s chunk protocol did; study.eval_context
    lowers the rolling context; the report states which."""
    out = tmp_path / "run"
    assert main(["run", str(DEBUG / "study.yaml"), f"out_dir={out}", "study.budget_steps=12",
                 "study.arms=[seed,monolith]", *over, *QUIET]) == 0
    res = json.loads((out / "results.json").read_text())
    m = res["models"]["seed"]
    kw = (dict(protocol="chunks", max_batches=2) if "chunks" in over[0]
          else dict(context=16))  # fmt: skip
    rep = evaluate_checkpoint(out / m["checkpoint"], ["text", "code", "dna"], batch_size=8,
                              progress=False, **kw)  # fmt: skip
    for dom, v in rep["domains"].items():
        assert m["eval"][dom]["bpb"] == pytest.approx(v["bpb"], rel=1e-6), dom
    assert res["eval_protocol"] == rep["protocol"]
    word = "packed chunks" if "chunks" in over[0] else "context 16 tokens"
    assert word in (out / "report.md").read_text()
