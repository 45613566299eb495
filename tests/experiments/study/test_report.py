"""Report generator: numbers land in the right cells, plots are real PNGs, partial input is fine."""

import copy
import dataclasses
import math
import re

import numpy as np
import pytest
from helpers import DEBUG

from moe.eval.stats import holm, verdict
from moe.experiments.study.report import (
    aggregate,
    format_delta,
    format_flops,
    format_mean_std,
    format_num,
    format_pct,
    format_seconds,
    render_report,
    write_aggregate_report,
    write_report,
)

M = "\u2212"  # the report's minus sign
DOMAINS = ["text", "code", "dna"]

# hand-chosen bpb per model: (text, code, dna); None = no eval for that domain
BPB = {
    "seed": (2.50, 2.00, 1.90),
    "branch-text": (2.30, 2.10, 1.95),
    "branch-code": (2.60, 1.70, 2.00),
    "branch-dna": (2.90, 2.35, 1.80),
    "ft-code-1": (2.70, 1.60, 2.05),
    "ft-code-2": (2.66, 1.64, 2.03),
    "merge-code": (2.62, 1.58, 2.01),
    "btx": (2.35, 1.75, 1.85),
    "moe": (2.20, 1.60, 1.95),
    "dense-compute": (2.25, 1.70, 1.85),
    "dense-data": (2.40, 1.80, 1.90),
    "btm": (2.28, 1.65, None),
    "avg": (2.45, 1.90, 1.88),
}
ARM_OF = {"seed": "seed", "btx": "moe", "moe": "moe", "dense-compute": "compute_matched",
          "dense-data": "data_matched", "btm": "btm_ensemble", "avg": "param_average",
          "merge-code": "merge"}


def _model(name, bpb):
    m = {"arm": ARM_OF.get(name), "checkpoint": f"stages/{name}/model", "train_flops": 1.2e12,
         "tokens": 307200, "active_params": 812345, "total_params": 812345, "routing": None,
         "eval": {d: {"loss": None if b is None else b * 0.69, "bpb": b, "tokens": 4096,
                      "bytes": 4090} for d, b in zip(DOMAINS, bpb)}}
    if name.startswith("branch-"):
        m.update(arm="branch", domain=name.removeprefix("branch-"))
    if name.startswith("ft-"):
        m.update(arm="finetune", family="code")
    if name == "merge-code":
        m["family"] = "code"
    return m


def make_results():
    models = {n: _model(n, b) for n, b in BPB.items()}
    models["dense-compute"]["train_flops"] = 2.4e12
    models["moe"]["total_params"] = 2_000_000
    models["moe"]["routing"] = {
        "experts": DOMAINS,
        "share": {"text": [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1]],
                  "code": [[0.1, 0.8, 0.1], [0.2, 0.7, 0.1]],
                  "dna": [[0.5, 0.5, 0.0], [0.3, 0.3, 0.4]]},
        "dead_experts": [{"layer": 0, "expert": "dna"}],
    }
    stages = [
        {"name": "seed", "kind": "dense", "steps": 150, "tokens": 307200, "flops": 1.2e12,
         "wall_s": 40.1, "active_params": 812345, "total_params": 812345},
        {"name": "split", "kind": "split", "steps": 0, "tokens": 0, "flops": 0.0, "wall_s": 0.5,
         "active_params": 812345, "total_params": 2_000_000},
        {"name": "branch-code", "kind": "branch", "steps": 100, "tokens": 204800,
         "flops": 8.0e11, "wall_s": 30.0, "active_params": 812345, "total_params": 812345},
    ]

    def curve(scale):
        return [{"flops": f, "loss": {"text": scale * 3 / k, "code": scale * 2 / k,
                                      "dna": scale * 1.5 / k}}
                for k, f in enumerate([1e11, 3e11, 1e12, 2.4e12], start=1)]

    return {
        "name": "unit", "seed": 1234, "created": "2026-11-23T19:30:00+0000", "wall_s": 512.3,
        "device": "cpu (2 threads)", "domains": DOMAINS, "experts": DOMAINS,
        "split_method": "copy", "stages": stages, "models": models,
        "arms": {"experts (BTX + router)": "moe", "monolithic, compute-matched": "dense-compute",
                 "monolithic, data-matched": "dense-data", "BTM ensemble": "btm",
                 "parameter average": "avg", "seed": "seed"},
        "reference_arm": "monolithic, compute-matched",
        "curves": {"monolithic, compute-matched": curve(1.0),
                   "experts (BTX + router)": curve(0.95)},
        "merge": {"family": "code", "method": "ties", "inputs": ["ft-code-1", "ft-code-2"],
                  "output": "merge-code"},
        "command": "moe run recipes/quickstart.yaml",
    }


def section(md: str, title: str) -> str:
    """The text of one `## title` section."""
    parts = md.split("\n## ")
    hit = [p for p in parts if p.startswith(title)]
    assert hit, f"no section {title!r}"
    return hit[0]


def table_rows(text: str) -> dict[str, list[str]]:
    """First cell -> the other cells, for every table body row in `text`."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| :") and not line.startswith("| -"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    path = write_report(make_results(), run_dir)
    return run_dir, path, path.read_text(encoding="utf-8")


def test_formatters():
    assert format_flops(1.234e12) == "1.23e12"
    assert format_flops(5e-3) == f"5.00e{M}3"
    assert format_flops(0.0) == "0"
    assert format_delta(-0.3123) == f"{M}0.312"
    assert format_delta(0.05) == "+0.050"
    assert format_delta(-0.0001) == f"{M}0.000"
    assert format_delta(0.3 - (0.1 + 0.2)) == "+0.000"  # float noise is no gain
    assert format_pct(-4.44) == f"{M}4.4%"
    assert format_num(None) == "-" and format_num(float("nan")) == "-"
    assert format_mean_std(2.0, None) == "2.000 ± -"
    assert format_mean_std(-0.1, 0.02, signed=True) == f"{M}0.100 ± 0.020"
    assert format_seconds(512.3) == "8m 32s"


def test_bpb_table_cells_and_bold(report):
    _, _, md = report
    rows = table_rows(section(md, "Per-domain bits per byte"))
    # columns: model, text, code, dna, mean
    assert rows["monolithic, compute-matched"] == ["`dense-compute`", "2.250", "1.700",
                                                  "**1.850**", "1.933"]
    assert rows["experts (BTX + router)"] == ["`moe`", "**2.200**", "**1.600**", "1.950",
                                             "**1.917**"]
    # a missing domain shows "-" and leaves the mean undefined
    assert rows["BTM ensemble"][3:] == ["-", "-"]
    assert set(rows) >= {"seed", "parameter average", "monolithic, data-matched"}


def test_gains_are_arm_minus_reference(report):
    _, _, md = report
    rows = table_rows(section(md, "Gains vs the compute-matched"))
    assert rows["experts (BTX + router)"][1:4] == [
        f"{M}0.050 ({M}2.2%)", f"{M}0.100 ({M}5.9%)", "+0.100 (+5.4%)"]
    assert rows["BTM ensemble"][3] == "- (-)"
    assert "monolithic, compute-matched" not in rows  # the reference is not compared to itself


def test_answer_sentence(report):
    _, _, md = report
    answer = section(md, "Answer")
    assert "on **text** it beats it, 2.200 vs 2.250" in answer
    assert "on **code** it beats it" in answer
    assert "on **dna** it does not beat it, 1.950 vs 1.850 (+0.100 bpb, +5.4%)" in answer
    # worst forgetting: branch-dna on text, 2.50 -> 2.90
    assert "`branch-dna` on text, 2.500 → 2.900 (+0.400 bpb, +16.0%" in answer


def test_specialization_matrix(report):
    _, _, md = report
    rows = table_rows(section(md, "Specialization"))
    assert rows["`seed`"] == ["-", "2.500", "2.000", "1.900"]
    assert rows["`branch-code`"] == ["code", "2.600 (+0.100)", f"**1.700 ({M}0.300)**",
                                     "2.000 (+0.100)"]
    assert rows["`branch-dna`"][3] == f"**1.800 ({M}0.100)**"
    assert list(rows)[2:] == ["`branch-text`", "`branch-code`", "`branch-dna`"]


def test_ledger_and_merge_and_routing(report):
    _, _, md = report
    stages_text, totals_text = section(md, "Compute ledger").split("Per-arm totals")
    ledger = table_rows(stages_text)
    assert ledger["seed"][:4] == ["dense", "150", "307,200", "1.20e12"]
    assert ledger["split"][3] == "0"
    assert ledger["**total**"][1:4] == ["250", "512,000", "2.00e12"]
    totals = table_rows(totals_text)
    assert totals["experts (BTX + router)"][1:3] == ["1.20e12", "×0.50"]
    assert totals["monolithic, compute-matched"][1:3] == ["2.40e12", "×1.00"]
    assert totals["experts (BTX + router)"][4:] == ["812,345", "2,000,000"]

    merge = table_rows(section(md, "Merging within a family"))
    assert merge["mean of fine-tunes"] == ["2.680", "1.620", "2.040"]
    assert merge["merged − mean of fine-tunes"] == [f"{M}0.060", f"{M}0.040", f"{M}0.030"]
    assert merge["merged − best fine-tune"][1] == f"{M}0.020"
    assert "`branch-code` (start)" in merge

    routing = section(md, "Router usage per domain")
    rows = table_rows(routing)
    assert rows["text"] == ["**85.0%**", "7.5%", "7.5%"]
    assert rows["dna"] == ["40.0%", "40.0%", "**20.0%**"]
    assert rows["1"] == ["80/10/10", "20/70/10", "30/30/40"]
    assert "layer 0 `dna`" in routing


def test_plots_are_pngs_and_nothing_else_is_written(report):
    run_dir, path, md = report
    assert path == run_dir / "report.md"
    assert sorted(p.name for p in run_dir.iterdir()) == ["plots", "report.md"]
    names = sorted(p.name for p in (run_dir / "plots").iterdir())
    assert names == ["bpb_by_domain.png", "loss_vs_flops.png", "specialization.png"]
    for name in names:
        data = (run_dir / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 1024
        assert f"](plots/{name})" in md
    assert "moe run recipes/quickstart.yaml" in md


def test_missing_optional_keys(tmp_path):
    res = make_results()
    for key in ("arms", "curves", "merge", "reference_arm", "command", "stages"):
        del res[key]
    res["models"]["moe"]["routing"] = None
    md = write_report(res, tmp_path).read_text(encoding="utf-8")
    # without `arms` every model is an arm; the reference falls back to the compute_matched one
    rows = table_rows(section(md, "Per-domain bits per byte"))
    assert rows["dense-compute"][1:4] == ["2.250", "1.700", "1.850"]
    assert rows["branch-dna"][3] == "**1.800**"
    assert "on **text** it beats" in section(md, "Answer")
    assert "Merging within a family" not in md and "Router usage" not in md
    assert "loss_vs_flops.png" not in md
    assert not (tmp_path / "plots" / "loss_vs_flops.png").exists()
    assert "moe run <recipe>" in md


def test_no_reference_no_experts_no_models(tmp_path):
    res = make_results()
    for name in ("moe", "btx", "dense-compute"):
        del res["models"][name]
    md = render_report(res)
    assert "No comparison" in section(md, "Answer")
    assert "nothing to compare against" in md
    md = write_report({"name": "empty"}, tmp_path).read_text(encoding="utf-8")
    assert "No evaluated models." in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def _seeded(i: int) -> dict:
    """Seed i: moe's text bpb 2.2 + 0.1 i, dense-compute's 2.25 + 0.05 i (paired gains)."""
    res = make_results()
    res["seed"] = 100 + i
    res["models"]["moe"]["eval"]["text"]["bpb"] = 2.2 + 0.1 * i
    res["models"]["moe"]["eval"]["text"]["loss"] = 1.0 + i
    res["models"]["dense-compute"]["eval"]["text"]["bpb"] = 2.25 + 0.05 * i
    return res


def test_aggregate_mean_std():
    agg = aggregate([_seeded(i) for i in range(3)])
    assert agg["n"] == 3 and agg["seeds"] == [100, 101, 102]
    s = agg["models"]["moe"]["bpb"]["text"]
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(2.3)
    assert s["std"] == pytest.approx(0.1)
    loss = agg["models"]["moe"]["loss"]["text"]
    assert loss["mean"] == pytest.approx(2.0) and loss["std"] == pytest.approx(1.0)
    # constant across seeds: std 0
    assert agg["models"]["moe"]["bpb"]["code"]["std"] == pytest.approx(0.0)
    # a domain never evaluated: n 0, no mean
    assert agg["models"]["btm"]["bpb"]["dna"] == {"mean": None, "std": None, "half": None, "n": 0,
                                                  "values": []}
    # 95% CI half-width: t(0.975, 2) = 4.30265 times s / sqrt(n) = 0.1 / sqrt(3)
    assert s["half"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)
    assert agg["level"] == 0.95
    g = agg["gains"]["experts (BTX + router)"]["text"]
    # deltas per seed: -0.05, 0.0, +0.05
    assert g["delta"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert g["delta"]["std"] == pytest.approx(0.05)
    assert g["wins"] == 1
    assert g["delta"]["half"] == pytest.approx(4.302653 * 0.05 / math.sqrt(3), rel=1e-6)
    assert g["verdict"] == "not distinguishable"
    # no per-document scores: Student t over the seeds, p from the paired t-test
    assert g["test"]["method"] == "t" and g["test"]["p"] == pytest.approx(1.0)
    assert g["test"]["lo"] == pytest.approx(-g["delta"]["half"])
    verdicts = {d: agg["gains"]["experts (BTX + router)"][d]["verdict"] for d in DOMAINS}
    assert verdicts == {"text": "not distinguishable", "code": "wins", "dna": "loses"}
    assert agg["gains"]["BTM ensemble"]["dna"]["verdict"] is None  # never evaluated: no test
    assert agg["gains"]["BTM ensemble"]["dna"]["test"] is None
    # Holm over every tested cell: 5 arms × (3 domains + mean), less BTM's dna and mean
    assert agg["comparisons"] == 18
    assert agg["equivalence_margin"] == 0.01 and agg["bootstrap_iters"] == 2000
    assert agg["gains"]["experts (BTX + router)"]["code"]["delta"]["mean"] == pytest.approx(-0.1)
    assert "monolithic, compute-matched" not in agg["gains"]
    single = aggregate([_seeded(0)])
    assert single["models"]["moe"]["bpb"]["text"]["std"] is None
    assert single["models"]["moe"]["bpb"]["text"]["half"] is None
    assert single["gains"]["experts (BTX + router)"]["code"]["verdict"] == "one seed: not tested"
    assert single["comparisons"] == 0
    with pytest.raises(ValueError):
        aggregate([])


def test_aggregate_report(tmp_path):
    runs = [_seeded(i) for i in range(3)]
    del runs[2]["models"]["avg"]  # a model missing in one seed counts only the seeds that have it
    agg = aggregate(runs)
    assert agg["models"]["avg"]["bpb"]["text"]["n"] == 2
    path = write_aggregate_report(agg, tmp_path)
    md = path.read_text(encoding="utf-8")
    rows = table_rows(section(md, "Per-domain bits per byte"))
    assert rows["experts (BTX + router)"][1] == "2.300 ± 0.248"  # 95% CI, not the std
    assert rows["parameter average"][1] == "2.450 ± 0.000"
    assert rows["parameter average"][-1] == "2"
    assert rows["BTM ensemble"][-1] == "0–3"
    gains_text, verdict_text = section(md, "Gains vs the compute-matched").split("Verdicts (")
    gains = table_rows(gains_text)
    assert gains["experts (BTX + router)"][2] == f"{M}0.100 ± 0.000 ({M}5.9%; 3/3)"
    # old results (no per-document scores): the method says t over seeds, and why
    assert "Student t over the seeds' paired differences" in gains_text
    assert "these results hold no per-document scores" in gains_text
    assert "Holm-corrected across the table's 18 comparisons" in gains_text
    assert "equivalence margin 0.01 bpb" in gains_text
    answer = section(md, "Answer")
    assert f"on **code**: wins, {M}0.100 ± 0.000 bpb ({M}5.9%), lower in 3/3 seeds" in answer
    assert "on **dna**: loses, +0.100 ± 0.000 bpb" in answer
    assert "on **text**: not distinguishable, +0.000 ± 0.124 bpb" in answer
    assert "averaged over domains: not distinguishable" in answer
    verdicts = table_rows(verdict_text)
    assert verdicts["experts (BTX + router)"] == ["not distinguishable (p=1.000)", "wins (p<0.001)",
                                                 "loses (p<0.001)", "not distinguishable (p=1.000)"]
    assert verdicts["BTM ensemble"][2:] == ["-", "-"]
    assert "mean ± half-width of its 95% confidence interval" in md
    png = (tmp_path / "plots" / "bpb_by_domain.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1024
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots", "report.md"]
    assert not math.isnan(agg["models"]["moe"]["bpb_mean"]["mean"])
    assert copy.deepcopy(agg) == agg  # plain data: JSON-friendly, no shared objects


def test_aggregate_report_one_seed(tmp_path):
    md = write_aggregate_report(aggregate([_seeded(0)]), tmp_path).read_text(encoding="utf-8")
    rows = table_rows(section(md, "Per-domain bits per byte"))
    assert rows["experts (BTX + router)"][1] == "**2.200 (n=1, no CI)**"
    gains_text, verdict_text = section(md, "Gains vs the compute-matched").split("Verdicts (")
    assert table_rows(gains_text)["experts (BTX + router)"][1] == f"{M}0.050 ({M}2.2%; n=1, no CI)"
    assert "Verdicts: none tested" in gains_text
    assert table_rows(verdict_text)["experts (BTX + router)"] == ["one seed: not tested"] * 4
    answer = section(md, "Answer")
    assert f"on **text**: one seed: not tested, {M}0.050 bpb ({M}2.2%; n=1, no CI)" in answer
    assert "one seed: no confidence intervals" in md


def test_odd_inputs_do_not_crash(tmp_path):
    res = make_results()
    res["models"]["avg"].pop("eval")
    res["curves"]["empty"] = []
    res["curves"]["gappy"] = [{"flops": 1e12, "loss": {"text": None}}]
    res["stages"].append({"name": "odd"})
    res["merge"] = {"family": "code", "output": "merge-code"}
    res["models"]["moe"]["routing"] = {"share": {"text": [[0.5, 0.5]]}}
    res["arms"]["ghost"] = "not-evaluated"
    md = write_report(res, tmp_path / "a").read_text(encoding="utf-8")
    assert "ghost" not in md
    assert table_rows(section(md, "Per-domain bits per byte"))["parameter average"][1:] == [
        "-", "-", "-", "-"]
    write_aggregate_report(aggregate([res, make_results()]), tmp_path / "b")
    write_aggregate_report(aggregate([{"name": "bare"}]), tmp_path / "c")


# ------------------------------------------------------------- per-document tests and verdicts
DOCS = 60


def _with_docs(res: dict, i: int) -> dict:
    """Per-document scores for every model and domain, summing exactly to each bpb: the same
    documents (bytes) in every seed, a difficulty every model shares, and 1% noise of its own."""
    rng = np.random.default_rng(1000 + i)
    shared = np.random.default_rng(5)  # the held-out documents do not depend on the seed
    nbytes = {d: shared.integers(100, 2000, size=DOCS).astype(float) for d in DOMAINS}
    hard = {d: 1.0 + 0.3 * shared.standard_normal(DOCS) for d in DOMAINS}
    for m in res["models"].values():
        for d, e in (m.get("eval") or {}).items():
            if e.get("bpb") is None:
                continue
            w = hard[d] * (1.0 + 0.01 * rng.standard_normal(DOCS))
            nats = e["bpb"] * math.log(2) * nbytes[d] * w * nbytes[d].sum() / (nbytes[d] * w).sum()
            e["per_document"] = {"nats": nats.tolist(), "tokens": [1] * DOCS,
                                 "bytes": nbytes[d].tolist()}
    return res


def _doc_runs(n: int = 3, **set_bpb) -> list[dict]:
    runs = [_seeded(i) for i in range(n)]
    for r in runs:
        r["models"]["avg"]["eval"]["dna"]["bpb"] = 1.8515  # 0.0015 above the reference: a tie
        for (name, dom), v in set_bpb.items():
            r["models"][name]["eval"][dom]["bpb"] = v
    return [_with_docs(r, i) for i, r in enumerate(runs)]


@pytest.fixture(scope="module")
def doc_agg():
    return aggregate(_doc_runs())


def test_aggregate_bootstraps_seeds_and_documents(doc_agg):
    exp = doc_agg["gains"]["experts (BTX + router)"]
    for d in [*DOMAINS, "mean"]:
        t = exp[d]["test"]
        assert t["method"] == "bootstrap" and t["iters"] == 2000 and t["shared_documents"]
        # the point is each seed's ratio of sums, averaged: the seeds' paired mean
        assert t["mean"] == pytest.approx(exp[d]["delta"]["mean"], abs=1e-9)
        assert t["lo"] <= t["mean"] <= t["hi"] and 0 < t["p"] <= t["p_holm"] <= 1
        assert t["expansion"] == pytest.approx(2.689, abs=1e-3)  # 3 seeds
    assert exp["code"]["test"]["documents"] == DOCS and exp["mean"]["test"]["documents"] == 3 * DOCS
    assert {d: exp[d]["verdict"] for d in [*DOMAINS, "mean"]} == {
        "text": "not distinguishable", "code": "wins", "dna": "loses",
        "mean": "not distinguishable"}
    # 0.0015 bpb on DNA, every seed: real perhaps, but inside the margin
    assert doc_agg["gains"]["parameter average"]["dna"]["verdict"] == "tie"
    # Holm over the whole table (the mean column included), in one family
    cells = [c["test"] for row in doc_agg["gains"].values() for c in row.values() if c["test"]]
    assert doc_agg["comparisons"] == len(cells) == 18
    assert [t["p_holm"] for t in cells] == pytest.approx(holm([t["p"] for t in cells]))
    assert aggregate(_doc_runs()) == doc_agg  # deterministic
    assert copy.deepcopy(doc_agg) == doc_agg


def test_aggregate_report_states_the_method(doc_agg, tmp_path):
    md = write_aggregate_report(doc_agg, tmp_path).read_text(encoding="utf-8")
    gains_text, verdict_text = section(md, "Gains vs the compute-matched").split("Verdicts (")
    assert ("hierarchical paired bootstrap over the 3 seeds and the held-out documents "
            f"(text {DOCS}, code {DOCS}, dna {DOCS}), 2,000 resamples") in gains_text
    assert "Holm-corrected across the table's 18 comparisons" in gains_text
    assert "equivalence margin 0.01 bpb" in gains_text and "Student t" not in gains_text
    assert gains_text.index("hierarchical") < gains_text.index("| arm |")  # above the table
    cell = table_rows(gains_text)["experts (BTX + router)"][2]  # code: [lo, hi], asymmetric
    assert re.fullmatch(rf"{M}0\.100 \[{M}0\.1\d\d, {M}0\.0\d\d\] \({M}5\.9%; 3/3\)", cell), cell
    verdicts = table_rows(verdict_text)
    assert verdicts["experts (BTX + router)"][1] == "wins (p=0.018)"  # 2/2001 × 18
    assert verdicts["parameter average"][2].startswith("tie (")
    assert "on **code**: wins, " in section(md, "Answer")


def test_holm_turns_an_uncorrected_win_into_not_distinguishable():
    # BTM on text: −0.05 each seed apart from document noise would be clear; these three seeds
    # (t over seeds, no per-document scores) give p ≈ 0.013: significant alone, not among 18
    runs = [_seeded(i) for i in range(3)]
    for i, r in enumerate(runs):
        r["models"]["btm"]["eval"]["text"]["bpb"] = 2.25 + 0.05 * i + (-0.05, -0.04, -0.06)[i]
    g = aggregate(runs)["gains"]["BTM ensemble"]["text"]
    assert g["test"]["p"] == pytest.approx(1 - 8.660254 / math.sqrt(2 + 75), abs=1e-6)
    assert g["test"]["p"] < 0.05 <= g["test"]["p_holm"]
    assert verdict(g["delta"]["mean"], g["delta"]["half"]) == "beats"  # yesterday's verdict
    assert g["verdict"] == "not distinguishable"


def test_cells_without_documents_fall_back_to_t(tmp_path):
    runs = _doc_runs()
    del runs[1]["models"]["moe"]["eval"]["code"]["per_document"]
    agg = aggregate(runs)
    exp = agg["gains"]["experts (BTX + router)"]
    assert [exp[d]["test"]["method"] for d in [*DOMAINS, "mean"]] == [
        "bootstrap", "t", "bootstrap", "t"]  # the mean needs every domain's documents
    assert exp["code"]["verdict"] == "wins"
    md = write_aggregate_report(agg, tmp_path).read_text(encoding="utf-8")
    assert "Elsewhere: Student t over the seeds' paired differences" in md
    # documents of another set (another count) are not paired: t as well
    runs = _doc_runs()
    runs[0]["models"]["moe"]["eval"]["text"]["per_document"]["bytes"][0] += 1
    assert aggregate(runs)["gains"]["experts (BTX + router)"]["text"]["test"]["method"] == "t"


def test_margin_and_iterations_come_from_the_results(tmp_path):
    runs = _doc_runs()
    for r in runs:
        r.update(equivalence_margin=0.2, bootstrap_iters=2500)
    agg = aggregate(runs)
    assert agg["equivalence_margin"] == 0.2 and agg["bootstrap_iters"] == 2500
    exp = agg["gains"]["experts (BTX + router)"]
    assert exp["code"]["test"]["iters"] == 2500
    assert exp["code"]["verdict"] == "tie"  # −0.1 bpb is within ±0.2
    assert aggregate(runs, margin=0.0)["gains"]["parameter average"]["dna"]["verdict"] != "tie"
    # too few resamples for 18 comparisons: raised until the smallest p, 2 / (B + 1), survives
    # Holm (B + 1 ≥ 4 · 18 / 0.05); a sweep of 4 values corrects 4 such tables together
    few = aggregate(runs, iters=100, margin=0.01)
    assert few["gains"]["experts (BTX + router)"]["dna"]["test"]["iters"] == 1439
    assert few["gains"]["seed"]["dna"]["verdict"] == "loses"
    sweep = aggregate(runs, iters=100, family=4)
    assert sweep["gains"]["seed"]["dna"]["test"]["iters"] == 5759
    md = write_aggregate_report(few, tmp_path).read_text(encoding="utf-8")
    assert "1,439 resamples (study.bootstrap_iters 100, raised so that" in md


def test_sweep_corrects_across_every_value(doc_agg):
    from moe.experiments.study.report.sweep import render_sweep_report
    from moe.experiments.study.sweep import summarize

    before = copy.deepcopy(doc_agg)
    summary = summarize("study.budget_steps", ["100", "200"], [doc_agg, doc_agg])
    assert doc_agg == before  # each value's own verdicts are left as they were
    assert summary["comparisons"] == 36
    cells = [c["test"] for p in summary["points"] for row in p["gains"].values()
             for c in row.values() if c["test"]]
    assert [t["p_holm"] for t in cells] == pytest.approx(holm([t["p"] for t in cells]))
    assert cells[0]["p_holm"] >= doc_agg["gains"]["experts (BTX + router)"]["text"]["test"][
        "p_holm"]
    code = summary["points"][0]["gains"]["experts (BTX + router)"]["code"]
    assert code["verdict"] == "wins" and code["test"]["p_holm"] == pytest.approx(36 * 2 / 2001)
    md = render_sweep_report(summary)
    assert "Holm-corrected across all 36 comparisons of this sweep" in md
    row = table_rows(section(md, "code"))["100"]
    assert row[1].startswith(f"{M}0.100 [") and row[1].endswith("(wins)")


def test_study_settings_are_checked():
    from moe.config import ConfigError, StudyConfig, load_recipe
    from moe.experiments.study.check import check_recipe
    from moe.experiments.study.records import StudyResult

    for over, msg in (("study.equivalence_margin=-0.01", "equivalence_margin must be at least 0"),
                      ("study.bootstrap_iters=99", "bootstrap_iters must be at least 100")):
        with pytest.raises(ConfigError, match=msg):
            check_recipe(load_recipe(DEBUG / "study.yaml", [over]))
    check_recipe(load_recipe(DEBUG / "study.yaml", ["study.equivalence_margin=0",
                                                    "study.bootstrap_iters=100"]))
    fields = {f.name: f.default for f in dataclasses.fields(StudyResult)}
    assert fields["equivalence_margin"] == StudyConfig().equivalence_margin
    assert fields["bootstrap_iters"] == StudyConfig().bootstrap_iters
