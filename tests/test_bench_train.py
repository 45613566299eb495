"""tools/bench_train.py runs end to end at debug size (no timing asserts)."""

import json

from helpers import load_tool


def _load():
    return load_tool("bench_train")


def test_bench_train_debug(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "res.json"
    args = [
        "--size",
        "debug",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--batch",
        "6",
        "--seq-len",
        "16",
        "--json",
        str(out),
    ]
    assert bench.main(args) == 0
    text = capsys.readouterr().out
    assert "| variant | step ms (median) |" in text
    for name in ("dense", "moe-torch", "moe-loop"):
        assert f"| {name} |" in text
    res = json.loads(out.read_text())
    p = res["params"]
    assert p["dense"]["active"] == p["moe"]["active"]
    assert p["moe"]["total"] > p["dense"]["total"]
    assert [r["variant"] for r in res["results"]] == ["dense", "moe-torch", "moe-loop"]
    assert res["results"][0]["ratio_vs_dense"] == 1.0


def test_bench_train_configs_match_active_params():
    bench = _load()
    from moe.model.flops import count_params

    for size in ("debug", "tiny"):
        dense, moe = bench.configs(size, 3, "torch")
        assert count_params(dense).active == count_params(moe).active
        assert moe.moe.router == "domain"
