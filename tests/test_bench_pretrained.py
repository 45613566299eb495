"""tools/bench_pretrained.py: both sides of each pair compute the same function, its memory and
matmul measures measure what they say, and it runs end to end (tiny depth, no timing asserts)."""

import json

import pytest
import torch
from helpers import load_tool

pytest.importorskip("transformers")



def _load():
    return load_tool("bench_pretrained")


def _same_weights(bench, pair):
    from moe.io.hf_export import hf_state_dict

    torch.manual_seed(0)
    ours = bench.build(pair, "ours", 1).eval()
    hf = bench.build(pair, "hf", 1).eval()
    ours_sd = ours.state_dict()
    if pair == "moe":
        # transformers keeps Mixtral's experts fused in memory: gate_up (E, 2F, C), down
        # (E, C, F); ours are (E, in, out) per projection
        moe = {k: ours_sd.pop(k) for k in list(ours_sd) if ".ffn." in k}
        sd = hf_state_dict(ours.config, ours_sd)  # attention, norms, embedding
        pre = "model.layers.0.mlp"
        sd[f"{pre}.gate.weight"] = moe["layers.0.ffn.router.weight"]
        sd[f"{pre}.experts.gate_up_proj"] = torch.cat(
            [moe["layers.0.ffn.w1"].transpose(1, 2), moe["layers.0.ffn.w3"].transpose(1, 2)], 1
        )
        sd[f"{pre}.experts.down_proj"] = moe["layers.0.ffn.w2"].transpose(1, 2)
    else:
        sd = hf_state_dict(ours.config, ours_sd)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return ours, hf


def test_dense_pair_steps_compute_the_same_loss():
    bench = _load()
    ours, hf = _same_weights(bench, "dense")
    ids = torch.randint(
        0, bench.SHAPE["vocab"], (1, 24), generator=torch.Generator().manual_seed(1)
    )
    a = bench.step_fn(ours, "ours", ids)()
    b = bench.step_fn(hf, "hf", ids)()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_moe_pair_computes_the_same_logits():
    bench = _load()
    ours, hf = _same_weights(bench, "moe")
    ids = torch.randint(
        0, bench.SHAPE["vocab"], (1, 24), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_cpu_peak_counts_what_a_step_holds_at_once():
    bench = _load()
    n = 4 << 20  # 4 Mi floats, 16 MiB

    def run():
        a = torch.ones(n)
        b = a * 2  # both alive: 32 MiB
        del a, b
        c = torch.ones(n // 2)  # 8 MiB after both were freed
        return c.sum()

    peak = bench.cpu_peak_bytes(run)
    assert 32 * 2**20 <= peak < 33 * 2**20


def test_gemm_share_tells_matmuls_from_the_rest():
    bench = _load()
    x = torch.randn(256, 256)
    assert bench.gemm_share(lambda: [x @ x for _ in range(20)]) > 0.8
    assert bench.gemm_share(lambda: [x.exp() for _ in range(20)]) == 0.0


def test_runs_both_pairs_end_to_end(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "res.json"
    args = ["--layers", "1", "--seq", "16", "--steps", "2", "--threads", "1", "--profile"]
    assert bench.main(args + ["--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| dense vs LlamaForCausalLM |" in text and "| moe vs MixtralForCausalLM |" in text
    res = json.loads(out.read_text())["results"]
    assert [r["pair"] for r in res] == ["dense", "moe"]
    for r in res:
        for side in ("ours", "hf"):
            assert len(r[side]["times"]) == 2 and r[side]["peak_bytes"] > 0
            assert 0 < r[side]["gemm_share"] < 1
        # same shapes on both sides: the pair compares equal models
        assert r["ours"]["params"] == r["hf"]["params"]
        assert r["speedup_range"][0] <= r["speedup"] <= r["speedup_range"][1]


def test_unknown_pair_is_refused_in_one_line():
    bench = _load()
    with pytest.raises(SystemExit, match="unknown pair 'sparse'"):
        bench.main(["--pairs", "sparse"])
    with pytest.raises(SystemExit, match="use it with --device cpu"):
        bench.main(["--device", "cuda", "--profile"])
