"""`moe sweep`: the swept override, crossovers, refusal of another sweep's directory, and a tiny
end-to-end sweep."""

import json

import pytest
from helpers import DEBUG

from moe.cli import main
from moe.config import ConfigError
from moe.experiments.study.sweep import (
    _value_dir,
    _value_overrides,
    best_value,
    crossover,
    split_sweep_override,
    value_label,
)

QUIET = "trainer.enable_progress_bar=false"


def test_the_swept_override_is_the_one_with_a_top_level_comma():
    plain, sweep = split_sweep_override(["data.domains=[text,code]", "study.budget_steps=1,2,3",
                                         "seed=3"])
    assert plain == ["data.domains=[text,code]", "seed=3"]
    assert sweep == ("study.budget_steps", ["1", "2", "3"])
    with pytest.raises(ConfigError, match="one swept key"):
        split_sweep_override(["a=1,2", "b=3,4"])


def test_crossover_is_named_where_the_sign_changes():
    # (value, mean of arm - reference, CI half-width): behind, behind, ahead, ahead
    got = crossover([("1", 0.05, 0.01), ("2", 0.01, 0.02), ("3", -0.02, 0.01), ("4", -0.05, 0.01)])
    assert got["between"] == ["2", "3"]
    assert not got["significant"]  # at value 2 the interval includes zero
    assert got["verdicts"] == ["loses", "not distinguishable at 95%", "beats", "beats"]
    assert "starts winning" in got["summary"]
    none = crossover([("1", 0.05, 0.01), ("2", 0.03, 0.01)])
    assert none["between"] is None and "behind at every value" in none["summary"]
    one_seed = crossover([("1", 0.05, None), ("2", -0.03, None)])
    assert one_seed["between"] == ["1", "2"] and not one_seed["significant"]
    assert "not both ends distinguishable at 95%" in one_seed["summary"]


def test_crossover_uses_the_sweeps_corrected_verdicts():
    # the intervals alone would call both ends; the sweep's Holm-corrected verdicts do not
    got = crossover([("1", 0.05, 0.01, "loses"), ("2", -0.05, 0.01, "not distinguishable")])
    assert got["between"] == ["1", "2"] and not got["significant"]
    assert got["verdicts"] == ["loses", "not distinguishable"]
    assert "not both ends distinguishable after Holm correction" in got["summary"]
    got = crossover([("1", 0.05, 0.01, "loses (< margin)"), ("2", -0.05, 0.01, "wins")])
    assert got["significant"] and "both ends distinguishable after Holm" in got["summary"]
    assert not crossover([("1", 0.005, 0.001, "tie"), ("2", -0.05, 0.01, "wins")])["significant"]


def test_a_mapping_value_sets_several_keys_at_once():
    v = json.dumps({"dim": 64, "ffn_dim": 192})
    assert _value_overrides("model", v) == ["model.dim=64", "model.ffn_dim=192"]
    assert value_label(v) == "dim=64, ffn_dim=192" and value_label("200") == "200"
    assert _value_dir("model", v) == "model=dim64_ffn_dim192"
    grow = json.dumps({"model.dim": 64, "study.budget_flops": 4e12})
    assert _value_overrides(".", grow) == ["model.dim=64", "study.budget_flops=4000000000000.0"]
    assert _value_dir(".", grow) == "dim64_budget_flops4e+12"
    assert value_label(grow) == "model.dim=64, study.budget_flops=4e+12"
    assert _value_overrides("study.budget_steps", "300") == ["study.budget_steps=300"]


def test_the_size_sweeps_reference_table_marks_the_lowest_loss():
    from moe.experiments.study.report.sweep import _reference_section

    def point(v, bpb):
        return {"value": v, "monolith_flops": 1e12, "gains": {},
                "reference": {"total_params": 1000, "tokens": 20000, "tokens_per_param": 20.0,
                              "epochs": {"text": 0.5}, "bpb": {
                                  "text": {"mean": bpb, "half": 0.01},
                                  "mean": {"mean": bpb, "half": 0.01}}}}

    pts = [point("a", 2.5), point("b", 2.1), point("c", 2.3)]
    assert best_value(pts) == 1
    text = "\n".join(_reference_section({"points": pts, "domains": ["text"], "key": "model",
                                          "reference_arm": "monolith"}))
    assert "**2.100 ± 0.010**" in text and "**2.500" not in text
    assert "compute-optimal" in text


def test_a_size_sweep_plans_each_size_at_the_same_flops(tmp_path, capsys):
    rec = tmp_path / "sizes.yaml"
    rec.write_text(f"defaults: [{DEBUG / 'study.yaml'}]\nstudy: {{budget_flops: 5.0e10, "
                   "arms: [seed, monolith]}\nsweep:\n  key: model\n  values:\n"
                   "    - {dim: 32, ffn_dim: 96}\n    - {dim: 64, ffn_dim: 192}\n")
    capsys.readouterr()
    assert main(["sweep", str(rec), f"out_dir={tmp_path / 's'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dim=32, ffn_dim=96; dim=64, ffn_dim=192" in out
    steps = [int(line.split()[1]) for line in out.splitlines() if line.startswith("budget:")]
    assert len(steps) == 2 and steps[0] > steps[1]


def test_sweep_labels_name_the_values_in_the_plan_and_the_report(tmp_path, capsys):
    from moe.experiments.study.report.sweep import render_sweep_report
    from moe.experiments.study.sweep import relabel

    rec = tmp_path / "sizes.yaml"
    body = (f"defaults: [{DEBUG / 'study.yaml'}]\nstudy: {{budget_flops: 5.0e10, "
            "arms: [seed, monolith]}\nsweep:\n  key: model\n  values:\n"
            "    - {dim: 32, ffn_dim: 96}\n    - {dim: 64, ffn_dim: 192}\n")
    rec.write_text(body + "  labels: [small, large]\n")
    capsys.readouterr()
    assert main(["sweep", str(rec), f"out_dir={tmp_path / 's'}", "--dry-run"]) == 0
    assert "over small; large" in capsys.readouterr().out
    rec.write_text(body + "  labels: [small]\n")
    assert main(["sweep", str(rec), f"out_dir={tmp_path / 's'}", "--dry-run"]) == 2
    assert "sweep.labels: 1 labels for 2 values" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()

    def point(v, gain):
        g = {"delta": {"mean": gain, "half": 0.01}, "verdict": "wins" if gain < 0 else "loses"}
        return {"value": v, "monolith_flops": 1e12, "n": 3, "gains": {"BTM": {"text": g}}}

    summary = {"key": ".", "values": ["a=1, b=2", "a=2, b=4"], "domains": ["text"],
               "arms": ["BTM"], "points": [point("a=1, b=2", 0.1), point("a=2, b=4", -0.1)],
               "crossovers": {}}
    out = relabel(summary, ["small", "large"])
    assert out["settings"] == ["a=1, b=2", "a=2, b=4"] and out["values"] == ["small", "large"]
    assert "between small and large" in out["crossovers"]["BTM"]["text"]["summary"]
    report = render_sweep_report(out)
    assert report.startswith("# moe-forge sweep report: a, b")
    assert "over small (a=1, b=2); large (a=2, b=4)" in report and "| value |" in report
    with pytest.raises(ConfigError, match="1 labels for 2"):
        relabel(summary, ["one"])


@pytest.mark.slow
def test_a_sweep_runs_each_value_and_reports_the_gains(tmp_path):
    out = tmp_path / "sw"
    args = ["sweep", str(DEBUG / "study.yaml"), f"out_dir={out}", QUIET,
            "study.arms=[seed,branches,btm,monolith]", "study.eval_batches=1",
            "study.budget_steps=24,40"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["values"] == ["24", "40"]
    assert [p["budget"]["total_steps"] for p in res["points"]] == [24, 40]
    per = [json.loads((out / f"budget_steps={v}" / "results.json").read_text()) for v in (24, 40)]
    for point, study in zip(res["points"], per):
        g = point["gains"]["BTM ensemble"]["code"]["delta"]["mean"]
        m = study["models"]
        assert g == pytest.approx(m["btm"]["eval"]["code"]["bpb"]
                                  - m["dense-compute"]["eval"]["code"]["bpb"])
    report = (out / "report.md").read_text()
    assert "Crossovers" in report and (out / "plots" / "gain_vs_sweep.png").is_file()
    # the same directory with another sweep is refused, nothing is trained
    assert main(["sweep", str(DEBUG / "study.yaml"), f"out_dir={out}", QUIET,
                 "study.arms=[seed,branches,btm,monolith]", "study.eval_batches=1",
                 "study.budget_steps=24,48"]) == 2
    assert not (out / "budget_steps=48").exists()
