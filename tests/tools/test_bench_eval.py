"""tools/bench_eval.py: both sides score the same documents to the same NLL, its memory measure
measures what it says, and it runs end to end on the tiny shape (no timing asserts)."""

import json

import numpy as np
import pytest
import torch
from helpers import load_tool

pytest.importorskip("transformers")


def _load():
    return load_tool("bench_eval")


@pytest.mark.parametrize("dtype,rtol", [("fp32", 1e-5), ("bf16", 2e-3)])
def test_both_sides_give_the_same_nll_per_document(dtype, rtol):
    bench = _load()
    ours = bench.build("ours", "tiny", 32).to(bench.DTYPES[dtype])
    hf = bench.build("hf", "tiny", 32).to(bench.DTYPES[dtype])
    # one window, a last window reaching back, several windows; a batch of 2 windows packs the
    # short ones together, with padding
    docs = bench.documents([5, 40, 90], 3, bench.SHAPES["tiny"]["vocab_size"], seed=1)
    a = bench.score_ours(ours, docs, 32, 2)
    b = bench.score_hf(hf, docs, 32, 2)
    np.testing.assert_allclose(a, b, rtol=rtol)
    per_token = b / np.array([5, 40, 90])
    assert np.all(np.abs(per_token - np.log(512)) > 0.05)  # far from uniform predictions

    # by hand: the 5-token document whole, each token after the ones before it (BOS first)
    seq = torch.tensor([[bench.PREFIX, *docs[0][0].tolist()]])
    with torch.no_grad():
        logp = hf(seq[:, :-1]).logits.float().log_softmax(-1)[0]
    want = -float(logp.gather(1, seq[0, 1:, None]).sum())
    assert b[0] == pytest.approx(want, rel=rtol)


def test_weights_are_the_same_on_both_sides():
    bench = _load()
    ours, hf = bench.build("ours", "tiny", 32), bench.build("hf", "tiny", 32)
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tied


def test_batches_respect_the_budget_longest_first():
    bench = _load()
    from moe.eval.rolling import windows

    wins = [w for i, n in enumerate([5, 40, 90, 12]) for w in windows(n, 32, None, i)]
    got = bench.batches(wins, 64)
    flat = [w for b in got for w in b]
    assert len(flat) == len(wins) and set(flat) == set(wins)  # every window once
    lengths = [w.hi - w.lo for b in got for w in b]
    assert lengths == sorted(lengths, reverse=True)
    assert all(len(b) * (b[0].hi - b[0].lo) <= 64 or len(b) == 1 for b in got)


def test_peak_rss_counts_what_a_run_touches():
    bench = _load()

    def run():
        a = torch.ones(16 << 20)  # 64 MiB, written
        return float(a[-1])

    peak, how = bench.peak_rss_bytes(run)
    assert how in ("VmHWM", "ru_maxrss delta")
    if how == "VmHWM":  # the delta of a high-water mark can read 0 after an earlier, larger peak
        assert 60 * 2**20 <= peak < 120 * 2**20


def test_bad_arguments_are_refused():
    bench = _load()
    with pytest.raises(SystemExit):
        bench.parse_args(["--dtype", "fp16"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--doc-tokens", "10,x"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--context", "0"])


def test_end_to_end_tiny(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "bench.json"
    rc = bench.main(["--shape", "tiny", "--dtype", "fp32,bf16", "--context", "64", "--docs", "3",
                     "--doc-tokens", "20,150", "--batch-size", "2", "--repeats", "2",
                     "--json", str(out)])  # fmt: skip
    assert rc == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| dtype | ours tok/s | transformers tok/s |")
    assert [r.split("|")[1].strip() for r in table[2:4]] == ["fp32", "bf16"]

    rep = json.loads(out.read_text())
    assert rep["windows"] == 1 + 3 + 1  # 20 tokens: 1 window; 150: 3; 20: 1
    assert [r["dtype"] for r in rep["results"]] == ["fp32", "bf16"]
    for r in rep["results"]:
        assert r["tokens"] == 20 + 150 + 20
        for side in ("ours", "hf"):
            s = r[side]
            assert len(s["nats"]) == 3 and len(s["times"]) == 2
            assert s["tokens_per_s"] > 0 and s["peak_bytes"] >= 0 and s["params"] > 0
        assert r["ratio_range"][0] <= r["ratio"] <= r["ratio_range"][1]
        np.testing.assert_allclose(r["ours"]["nats"], r["hf"]["nats"],
                                   rtol=1e-5 if r["dtype"] == "fp32" else 2e-3)  # fmt: skip
        assert r["nll"]["max_rel"] < (1e-5 if r["dtype"] == "fp32" else 2e-3)
