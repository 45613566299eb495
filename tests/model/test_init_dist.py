"""moe/model/init_dist.py (`moe init`) and the init-from-distribution study runner."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from generate_fixtures import tiny_config
from helpers import REPO

from moe.config import ConfigError
from moe.io.checkpoint import load_checkpoint, make_meta, read_meta, save_checkpoint
from moe.model.init_dist import init_state, select_indices, select_tensor
from moe.model.transformer import Transformer


def heavy_tailed_source(seed: int = 0) -> tuple[dict[str, torch.Tensor], object]:
    """A dense model whose tensors are drawn from a skewed, heavy-tailed distribution (no
    Gaussian), standing in for trained weights."""
    cfg = tiny_config()
    torch.manual_seed(seed)
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.state_dict().items():
        t = torch.distributions.StudentT(3.0).sample(p.shape) * 0.05
        sd[name] = (t + 0.3 * t.abs() + 0.01 * torch.randn(p.shape, generator=g)).float()
    return sd, model.config


def test_histogram_reproduces_quantiles_within_sampling_error():
    sd, cfg = heavy_tailed_source()
    out = init_state(sd, cfg, "histogram", seed=1).state_dict
    name = "tok_emb.weight"  # 259 x 32 = 8288 values
    src, new = sd[name].flatten().double(), out[name].flatten().double()
    n = new.numel()
    for q in (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99):
        # the sample quantile's rank lies within ±4 binomial sd of q·n; compare in CDF space
        rank = (src <= torch.quantile(new, q)).double().mean()
        assert abs(float(rank) - q) < 4 * (q * (1 - q) / n) ** 0.5 + 1.0 / n, q
    assert not torch.equal(out[name], sd[name])


def test_shuffle_keeps_the_multiset_and_changes_the_function():
    sd, cfg = heavy_tailed_source()
    res = init_state(sd, cfg, "shuffle", seed=2)
    for name, w in sd.items():
        assert torch.equal(res.state_dict[name].flatten().sort().values, w.flatten().sort().values)
    assert not torch.equal(res.state_dict["layers.0.ffn.w1.weight"], sd["layers.0.ffn.w1.weight"])
    a, b = Transformer(cfg), Transformer(cfg)
    a.load_state_dict(sd)
    b.load_state_dict(res.state_dict)
    x = torch.randint(0, 259, (2, 16))
    with torch.no_grad():
        la, lb = a.eval()(x).logits, b.eval()(x).logits
    assert (la - lb).abs().max() > 1e-2


def test_gaussian_matches_mean_and_std():
    sd, cfg = heavy_tailed_source()
    out = init_state(sd, cfg, "gaussian", seed=3).state_dict
    for name in ("tok_emb.weight", "layers.0.ffn.w1.weight", "lm_head.weight"):
        w, v = sd[name].double(), out[name].double()
        se = float(w.std()) / w.numel() ** 0.5
        assert abs(float(v.mean() - w.mean())) < 5 * se
        assert abs(float(v.std() / w.std()) - 1) < 5 / (2 * w.numel()) ** 0.5 + 0.01


def test_spectrum_matches_singular_values():
    sd, cfg = heavy_tailed_source()
    out = init_state(sd, cfg, "spectrum", seed=4).state_dict
    for name in ("tok_emb.weight", "layers.0.attn.wq.weight", "layers.1.ffn.w2.weight"):
        s_src = torch.linalg.svdvals(sd[name].double())
        s_new = torch.linalg.svdvals(out[name].double())
        torch.testing.assert_close(s_new, s_src, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(out[name], sd[name])
    # 1-D tensors (norm gains) fall back to histogram: values within the source's range
    g = "layers.0.attn_norm.weight"
    assert out[g].min() >= sd[g].min() and out[g].max() <= sd[g].max()


def test_select_takes_evenly_spaced_indices():
    assert select_indices(6, 3).tolist() == [0, 2, 4]
    assert select_indices(8, 8).tolist() == list(range(8))
    w = torch.arange(24.0).view(4, 6)  # row r, col c holds 6r + c
    got = select_tensor(w, torch.Size([2, 3]))  # rows 0, 2; cols 0, 2, 4
    assert got.tolist() == [[0.0, 2.0, 4.0], [12.0, 14.0, 16.0]]


def test_select_makes_a_smaller_model_with_consistent_indices():
    sd, cfg = heavy_tailed_source()
    small = dataclasses.replace(cfg, n_layers=1, dim=16, ffn_dim=24, n_heads=2, n_kv_heads=1)
    res = init_state(sd, cfg, "select", small, seed=0)
    m = Transformer(res.config)
    m.load_state_dict(res.state_dict)  # every shape right, layers beyond the first dropped
    idx_c, idx_f = select_indices(32, 16), select_indices(48, 24)
    w1 = sd["layers.0.ffn.w1.weight"][idx_f][:, idx_c]
    assert torch.equal(res.state_dict["layers.0.ffn.w1.weight"], w1)
    assert torch.equal(res.state_dict["tok_emb.weight"], sd["tok_emb.weight"][:, idx_c])


def test_keep_norms_and_embeddings_copy_the_trained_tensors():
    sd, cfg = heavy_tailed_source()
    out = init_state(sd, cfg, "shuffle", seed=5, keep_norms=True, keep_embeddings=True).state_dict
    for name in ("norm.weight", "layers.0.ffn_norm.weight", "tok_emb.weight", "lm_head.weight"):
        assert torch.equal(out[name], sd[name])
    assert not torch.equal(out["layers.0.attn.wk.weight"], sd["layers.0.attn.wk.weight"])


def test_standard_and_trained():
    sd, cfg = heavy_tailed_source()
    torch.manual_seed(7)
    ref = Transformer(cfg).state_dict()
    std = init_state(sd, cfg, "standard", seed=7).state_dict
    assert all(torch.equal(std[k], ref[k]) for k in ref)
    tr = init_state(sd, cfg, "trained", seed=7).state_dict
    assert all(torch.equal(tr[k], sd[k]) for k in sd)


def test_bad_inputs_are_config_errors():
    sd, cfg = heavy_tailed_source()
    with pytest.raises(ConfigError, match="unknown method"):
        init_state(sd, cfg, "magic")
    with pytest.raises(ConfigError, match="needs the source's architecture"):
        init_state(sd, cfg, "histogram", dataclasses.replace(cfg, n_layers=1))
    with pytest.raises(ConfigError, match="larger than the source's"):
        init_state(sd, cfg, "select", dataclasses.replace(cfg, n_layers=3))


def test_cli_writes_a_loadable_checkpoint_with_lineage(tmp_path: Path):
    from moe.cli import main

    sd, cfg = heavy_tailed_source()
    src = save_checkpoint(tmp_path / "src", sd, cfg, make_meta(tokens_seen=1000))
    out = tmp_path / "init"
    assert main(["init", "--from", str(src), "--method", "histogram", "--out", str(out),
                 "--seed", "3", "--keep-norms"]) == 0
    ck = load_checkpoint(out)
    Transformer(ck.config).load_state_dict(ck.state_dict)
    meta = read_meta(out)
    assert meta["parents"] == [read_meta(src)["id"]] and meta["kind"] == "init"
    assert meta["recipe"]["init"]["method"] == "histogram" and meta["tokens_seen"] == 0
    assert torch.equal(ck.state_dict["norm.weight"], sd["norm.weight"])
    small = tmp_path / "small"
    assert main(["init", "--from", str(src), "--method", "select", "--out", str(small),
                 "model.dim=16", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=24"]) == 0
    assert load_checkpoint(small).config.dim == 16
    assert main(["init", "--from", str(src), "--method", "magic", "--out",
                 str(tmp_path / "x")]) == 2


def test_study_runner_on_debug_sizes(tmp_path: Path):
    """The whole init study (source, 3 arms x 2 warm-ups x 2 seeds, report) at debug size."""
    from moe.cli import main

    out = tmp_path / "study"
    assert main(["run", str(REPO / "recipes" / "init" / "debug.yaml"), f"out_dir={out}"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["final_bpb"]) == {f"{a}|warmup={w}" for a in
                                     ("standard", "histogram", "shuffle+emb") for w in (3, 0)}
    assert (out / "report.md").is_file() and (out / "plots" / "bpb_vs_step.png").is_file()
    assert res["diagnostics"]["histogram"]["0"]["w1_to_trained"] >= 0
    # resumes: a second run trains nothing new and gives the same numbers
    assert main(["run", str(REPO / "recipes" / "init" / "debug.yaml"), f"out_dir={out}"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["final_bpb"] == res["final_bpb"]
