"""Importance scores: mask gradients from weight gradients equal explicit masks; head scores
predict the loss change of actually removing each head (first order); MoE neuron scores; Block
Influence; magnitudes; files and bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from generate_fixtures import tiny_config

from moe.config import ConfigError, DataConfig, SourceConfig
from moe.model.transformer import Transformer
from moe.surgery import importance as imp
from moe.surgery.prune import PrunePlan, apply_plan


def _batch(vocab: int, B: int = 4, T: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T + 1), generator=g)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "domain": torch.zeros(B).long()}


def _model(seed=0, experts=(), **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(tiny_config(experts=experts, vocab_size=61), **kw)
    return Transformer(cfg).double().eval()


def _loss(m: Transformer, b: dict) -> float:
    with torch.no_grad():
        return float(imp._loss(m, b, None))


def test_weight_gradients_equal_explicit_mask_gradients():
    m = _model()
    b = _batch(61)
    ref = imp.mask_gradients_by_hooks(m, b)
    m.zero_grad()
    imp._loss(m, b, None).backward()
    fast = imp.weight_mask_gradients(m)
    torch.testing.assert_close(fast["heads"], ref["heads"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fast["ffn"], ref["ffn"], rtol=1e-9, atol=1e-12)
    assert ref["heads"].abs().max() > 1e-6  # not trivially zero


def test_head_scores_predict_actual_removal_hand_built():
    """A hand-built one-layer model whose four key/value groups write with very different
    strengths (wo columns scaled 0.02 .. 0.6): the mask gradient of each group equals, to first
    order, the loss change of actually removing it (a pruned model with smaller tensors), and
    ranks the groups as the actual removals do."""
    m = _model(seed=3, n_layers=1, n_heads=8, n_kv_heads=4)
    cfg = m.config
    Dh, g = cfg.head_size(), cfg.n_heads // cfg.n_kv_heads
    with torch.no_grad():
        for k, s in enumerate([0.3, 0.02, 0.6, 0.1]):
            m.layers[0].attn.wo.weight[:, k * g * Dh:(k + 1) * g * Dh] *= s
    b = _batch(61, B=8, seed=1)
    m.zero_grad()
    imp._loss(m, b, None).backward()
    grad_kv = imp.kv_groups(imp.weight_mask_gradients(m)["heads"], cfg.n_kv_heads)[0]  # (Hkv,)
    base = _loss(m, b)
    deltas = []
    for k in range(cfg.n_kv_heads):
        plan = PrunePlan([0], [[j for j in range(cfg.n_kv_heads) if j != k]], None)
        c2, sd2 = apply_plan(cfg, m.state_dict(), plan)
        pruned = Transformer(c2).double().eval()
        pruned.load_state_dict(sd2)
        assert pruned.config.n_heads == cfg.n_heads - g
        deltas.append(_loss(pruned, b) - base)
    deltas = torch.tensor(deltas, dtype=torch.float64)
    first_order = -grad_kv
    assert ((deltas - first_order).abs() <= 0.15 * first_order.abs() + 2e-6).all(), (
        deltas, first_order)
    assert torch.argsort(deltas.abs()).tolist() == torch.argsort(grad_kv.abs()).tolist()


def test_moe_neuron_scores_are_mask_gradients():
    m = _model(seed=1, experts=("text", "code"))
    last = m.config.n_layers - 1  # the last layer: no router downstream of it to flip
    with torch.no_grad():  # two strong neurons, so the loss moves well above fp32 rounding
        for e, j in ((0, 3), (1, 17)):
            m.layers[last].ffn.w2[e, j] *= 50
    b = _batch(61)
    m.zero_grad()
    imp._loss(m, b, None).backward()
    g = imp.weight_mask_gradients(m)["ffn"]  # (L, E, Fe)
    assert g.shape == (2, 2, 48)
    eps = 0.05  # the loss is quadratic in one neuron's mask: central differences are exact
    for e, j in ((0, 3), (1, 17)):
        losses = []
        for s in (1 + eps, 1 - eps):
            fm = torch.ones(2, 2, 48, dtype=torch.float64)
            fm[last, e, j] = s
            with imp.masked(m, ffn_mask=fm):
                losses.append(_loss(m, b))
        fd = (losses[0] - losses[1]) / (2 * eps)
        assert abs(fd - float(g[last, e, j])) <= 0.03 * abs(float(g[last, e, j])) + 1e-5
        assert abs(float(g[last, e, j])) > 1e-4


def test_scores_block_influence_and_magnitudes():
    m = _model(seed=2)
    with torch.no_grad():  # block 1 does nothing: its outputs write zeros
        m.layers[1].attn.wo.weight.zero_()
        m.layers[1].ffn.w2.weight.zero_()
    batches = [_batch(61, seed=s) for s in range(2)]
    s = imp.compute_importance(m, batches)
    assert s["layers.influence"][1] == pytest.approx(0.0, abs=1e-9)
    assert s["layers.influence"][0] > 1e-4
    assert set(s) == set(imp.SCORE_NAMES)
    # magnitudes by hand: the FFN hidden activations and head outputs of layer 0
    acts, heads = [], []
    lay = m.layers[0]
    h1 = lay.ffn.register_forward_pre_hook(lambda mod, a: acts.append(
        (F.silu(mod.w1(a[0])) * mod.w3(a[0])).abs().flatten(0, 1)))
    h2 = lay.attn.wo.register_forward_pre_hook(lambda mod, a: heads.append(
        a[0].view(*a[0].shape[:2], 4, -1).norm(dim=-1).flatten(0, 1)))
    with torch.no_grad():
        for b in batches:
            m(b["input_ids"])
    h1.remove()
    h2.remove()
    torch.testing.assert_close(s["ffn.magnitude"][0], torch.cat(acts).mean(0))
    torch.testing.assert_close(s["heads.magnitude"][0], torch.cat(heads).mean(0))
    torch.testing.assert_close(s["kv.magnitude"][0], s["heads.magnitude"][0].view(2, 2).sum(-1))


def test_scores_file_round_trip_and_combine(tmp_path):
    m = _model()
    s = {d: imp.compute_importance(m, [_batch(61, seed=i)]) for i, d in enumerate(["a", "b"])}
    p = imp.save_scores(tmp_path / "s.safetensors", s, {"checkpoint_sha256": "x"})
    back, info = imp.load_scores(p)
    assert info == {"checkpoint_sha256": "x"}
    for d in s:
        for n in imp.SCORE_NAMES:
            torch.testing.assert_close(back[d][n], s[d][n])
    both = imp.combine(back, "all")
    n = "ffn.taylor"
    torch.testing.assert_close(
        both[n], (s["a"][n] / s["a"][n].mean() + s["b"][n] / s["b"][n].mean()) / 2)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert 0 <= summary["jaccard"]["ffn.taylor@keep0.5"]["a|b"] <= 1
    with pytest.raises(ConfigError, match="--by c"):
        imp.combine(back, "c")


def test_jaccard_by_hand():
    a = imp.kept_sets(torch.tensor([[4.0, 3, 2, 1]]), 0.5)
    b = imp.kept_sets(torch.tensor([[4.0, 1, 3, 2]]), 0.5)
    assert a == [{0, 1}] and b == [{0, 2}]
    assert imp.jaccard(a, b) == pytest.approx(1 / 3)


def test_no_calibration_data_is_one_line_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    data = DataConfig(domains=["mine"], sources={"mine": SourceConfig(kind="files",
                                                                      paths=[str(empty)])})
    from moe.data.tokenizer import load_tokenizer

    with pytest.raises(ConfigError, match="mine"):
        imp.calibration_batches(data, 0, "mine", 2, 2, load_tokenizer(None))
    with pytest.raises(ConfigError, match="unknown domain"):
        imp.calibration_batches(data, 0, "klingon", 2, 2, load_tokenizer(None))


def test_importance_cli_bad_input_writes_nothing(debug_dense, tmp_path, capsys):
    from moe.cli import main

    out = tmp_path / "s.safetensors"
    for args, msg in ((["--domains", "klingon"], "klingon"),
                      (["--domains", "all"], "all"),
                      (["--domains", "text", "--batches", "0"], "batches")):
        assert main(["importance", str(debug_dense), "--out", str(out), *args]) == 2
        assert msg in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "s.json").exists()
    assert main(["importance", str(debug_dense), "--out", str(tmp_path / "s.pt"),
                 "--domains", "text"]) == 2
    assert main(["importance", str(debug_dense), "--out", str(out), "--domains", "text,dna",
                 "--batches", "1"]) == 0
    scores, info = imp.load_scores(out)
    assert set(scores) == {"text", "dna"} and len(info["checkpoint_sha256"]) == 64
