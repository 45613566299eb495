"""`moe prune`: a pruned model equals the masked original exactly; pruned checkpoints load,
train, merge and export; bad input is one line and writes nothing."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from generate_fixtures import tiny_config

from moe.config import ConfigError
from moe.io.checkpoint import load_checkpoint, read_meta
from moe.model.transformer import Transformer
from moe.surgery import importance as imp
from moe.surgery.prune import apply_plan, n_removed, plan_masks, plan_pruning


def _batch(vocab: int, B: int = 3, T: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T + 1), generator=g)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "domain": torch.zeros(B).long()}


CASES = [
    dict(kw={}, heads=0.5, ffn=0.25, layers=1, method="taylor"),
    dict(kw={"n_layers": 3}, heads=0.5, ffn=0.5, layers=0, method="magnitude"),
    dict(kw={"n_layers": 3, "tie_embeddings": True, "qkv_bias": True}, heads=0.0, ffn=0.7,
         layers=1, method="random"),
    dict(kw={"experts": ("text", "code")}, heads=0.5, ffn=0.25, layers=1, method="taylor"),
    dict(kw={"experts": ("text", "code"), "router": "domain"}, heads=0.0, ffn=0.5, layers=0,
         method="magnitude"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c['method']}-{i}" for i, c in enumerate(CASES)])
def test_pruned_model_equals_masked_original(case):
    kw = dict(case["kw"])
    experts, router = kw.pop("experts", ()), kw.pop("router", "learned")
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_config(experts=experts, router=router, vocab_size=61), **kw)
    m = Transformer(cfg).eval()
    for p in m.parameters():  # norm gains and biases away from 1 and 0, so a slip shows
        with torch.no_grad():
            p.add_(0.05 * torch.randn_like(p))
    b = _batch(61)
    hint = torch.zeros(3).long() if router == "domain" else None
    scores = imp.compute_importance(m, [b], ["text", "code", "dna"])
    plan = plan_pruning(cfg, scores, case["heads"], case["ffn"], case["layers"], case["method"],
                        seed=1)
    c2, sd2 = apply_plan(cfg, m.state_dict(), plan)
    pruned = Transformer(c2).eval()
    pruned.load_state_dict(sd2)
    assert pruned.num_params() < m.num_params()
    masks = plan_masks(cfg, plan)
    with torch.no_grad(), imp.masked(m, **masks):
        want = m(b["input_ids"], domain=hint).logits
    with torch.no_grad():
        got = pruned(b["input_ids"], domain=hint).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the masks really remove something: the unmasked model differs
    with torch.no_grad():
        full = m(b["input_ids"], domain=hint).logits
    assert (full - want).abs().max() > 1e-4


def test_plan_keeps_the_highest_scores_in_each_layer():
    cfg = tiny_config()
    s = {n: torch.zeros(1) for n in imp.SCORE_NAMES}
    s["kv.taylor"] = torch.tensor([[1.0, 2.0], [5.0, 3.0]])
    s["ffn.taylor"] = torch.arange(96.0).view(2, 48) * torch.tensor([[1.0], [-1.0]])
    s["layers.influence"] = torch.tensor([0.9, 0.1])
    plan = plan_pruning(cfg, s, heads=0.5, ffn=0.5, layers=0, method="taylor")
    assert plan.kv == [[1], [0]]
    assert plan.ffn[0][0] == list(range(24, 48)) and plan.ffn[1][0] == list(range(24))
    assert plan_pruning(cfg, s, layers=1).layers == [0]


def test_fractions_and_empty_layers():
    assert n_removed(10, 0.25, "ffn", False) == 2  # round(2.5) -> 2 (banker's)
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ConfigError, match=r"\[0, 1\)"):
            n_removed(10, bad, "heads", False)
    with pytest.raises(ConfigError, match="--allow-empty"):
        n_removed(2, 0.8, "heads", False)
    assert n_removed(2, 0.8, "heads", True) == 2


def test_allow_empty_heads_and_ffn_equal_masked_original(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=61)
    m = Transformer(cfg).eval()
    plan = plan_pruning(cfg, None, heads=0.9, ffn=0.99, method="random", allow_empty=True)
    c2, sd2 = apply_plan(cfg, m.state_dict(), plan, allow_empty=True)
    assert c2.n_heads == 0 and c2.ffn_dim == 1
    pruned = Transformer(c2).eval()
    pruned.load_state_dict(sd2)
    b = _batch(61)
    with torch.no_grad(), imp.masked(m, **plan_masks(cfg, plan)):
        want = m(b["input_ids"]).logits
    torch.testing.assert_close(pruned(b["input_ids"]).logits, want, rtol=1e-5, atol=1e-5)
    from moe.io.checkpoint import make_meta, save_checkpoint
    from moe.io.hf_export import export_hf

    save_checkpoint(tmp_path / "ck", sd2, c2, make_meta())
    with pytest.raises(ConfigError, match="no attention heads"):
        export_hf(tmp_path / "ck", tmp_path / "hf")


def test_pruned_checkpoint_loads_trains_merges_exports(debug_dense, tmp_path):
    transformers = pytest.importorskip("transformers")
    from moe.cli import main
    from moe.io.hf_export import export_hf
    from moe.merge import merge
    from moe.merge.config import merge_config_from_dict

    scores = tmp_path / "s.safetensors"
    assert main(["importance", str(debug_dense), "--domains", "text,code", "--out", str(scores),
                 "--batches", "2"]) == 0
    outs = []
    for i in (1, 2):  # the same plan (same scores), different healing data orders
        out = tmp_path / f"p{i}"
        assert main(["prune", str(debug_dense), "--out", str(out), "--heads", "0.5", "--ffn",
                     "0.5", "--layers", "1", "--scores", str(scores), "--by", "code",
                     "--heal-steps", "3", "--seed", str(i)]) == 0
        outs.append(out)
    ck = load_checkpoint(outs[0])
    src = load_checkpoint(debug_dense / "model")
    assert ck.config.n_layers == 1 and ck.config.n_kv_heads == 1 and ck.config.ffn_dim == 96
    assert ck.config.head_size() == src.config.resolved().head_size()
    meta = ck.meta
    assert meta["kind"] == "prune" and meta["parents"] == [src.meta["id"]]
    assert meta["base_id"] == src.meta["base_id"]
    assert meta["tokens_seen"] > src.meta["tokens_seen"]  # the healing tokens count
    assert meta["prune"]["heal"]["steps"] == 3
    # both prunes used one plan: the same units, so merging them is meaningful
    digest = meta["prune"]["plan"]["units_sha256"]
    assert digest == load_checkpoint(outs[1]).meta["prune"]["plan"]["units_sha256"]
    # merge: two healed prunes of one plan average like any two checkpoints of one family
    merged = merge(merge_config_from_dict({"merge_method": "linear", "models": [
        {"model": str(o)} for o in outs]}), tmp_path / "merged", progress=False)
    mk = load_checkpoint(merged)
    other = load_checkpoint(outs[1])
    for k, t in mk.state_dict.items():
        torch.testing.assert_close(t, (ck.state_dict[k] + other.state_dict[k]) / 2)
    # export: transformers computes the same logits (head_dim != hidden_size / heads)
    hf_dir = export_hf(outs[0], tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    ours = Transformer(ck.config).eval()
    ours.load_state_dict(ck.state_dict)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
    from moe.io.hf import import_hf

    back = load_checkpoint(import_hf(hf_dir, tmp_path / "back"))
    assert back.config.head_size() == ck.config.head_size()
    # train: moe train continues from the pruned checkpoint
    from helpers import DEBUG

    assert main(["train", str(DEBUG / "dense.yaml"), f"init={outs[0]}",
                 f"out_dir={tmp_path / 'train'}", "trainer.max_steps=2",
                 "trainer.enable_progress_bar=false"]) == 0


def test_prune_bad_input_is_one_line_and_writes_nothing(debug_dense, tmp_path, capsys):
    from moe.cli import main

    out = tmp_path / "p"
    other = tmp_path / "other.safetensors"
    s = {"text": imp.compute_importance(
        Transformer(load_checkpoint(debug_dense / "model").config), [_batch(259)])}
    imp.save_scores(other, s, {"checkpoint_sha256": "0" * 64})
    cases = [
        (["--heads", "1.0"], "[0, 1)"),
        (["--ffn", "-0.2"], "[0, 1)"),
        (["--heads", "0.9"], "--allow-empty"),
        (["--layers", "2"], "--layers"),
        (["--method", "fisher"], "--method"),
        (["--ffn", "0.5", "--scores", str(other)], "another checkpoint"),
        (["--ffn", "0.5", "--by", "klingon", "--domains", "text"], "klingon"),
        (["--ffn", "0.5", "--bits", "3"], "--bits"),
        (["--ffn", "0.5", "--scores", str(tmp_path / "none.safetensors")], "not found"),
    ]
    for args, msg in cases:
        assert main(["prune", str(debug_dense), "--out", str(out), *args]) == 2, args
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, (args, err)
        assert not out.exists()


def test_prune_records_compression(debug_dense, tmp_path):
    from moe.cli import main

    out = tmp_path / "q"
    assert main(["prune", str(debug_dense), "--out", str(out), "--ffn", "0.5", "--method",
                 "random", "--bits", "8", "--unstructured", "0.5"]) == 0
    c = read_meta(out)["prune"]["compression"]
    assert c["bits"] == 8 and c["unstructured"] == 0.5
    assert c["bytes"] < 0.5 * c["bytes_fp16"]
    json.dumps(c)


def test_prunes_of_different_units_are_not_merged(debug_dense, tmp_path, capsys):
    """Pruned by different domains' scores, two checkpoints have the same shapes but different
    neurons in the same rows: moe merge refuses them in one line, and writes nothing."""
    from moe.cli import main

    outs = []
    for dom in ("text", "dna"):
        out = tmp_path / f"p-{dom}"
        assert main(["prune", str(debug_dense), "--out", str(out), "--ffn", "0.5", "--by", dom,
                     "--domains", "text,dna", "--batches", "1"]) == 0
        outs.append(out)
    units = [load_checkpoint(o).meta["prune"]["plan"]["units_sha256"] for o in outs]
    assert units[0] != units[1]
    cfg = tmp_path / "merge.yaml"
    cfg.write_text("merge_method: linear\nmodels:\n" + "".join(f"  - model: {o}\n" for o in outs))
    capsys.readouterr()
    assert main(["merge", str(cfg), "--out", str(tmp_path / "merged")]) == 2
    assert "keep different units" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
