"""Qwen2-MoE import (moe/io/hf_qwen_moe.py): a tiny random transformers Qwen2MoeForCausalLM gives
our logits (fp32; max |diff| measured 9.7e-6, printed by the test), in the per-expert layout
save_pretrained writes and in transformers 5's fused one; our shared-expert MoEs (gated or not,
with or without q/k/v biases) survive export → import bit for bit; what our MoE cannot compute is
refused in one line naming the field, exit 2, nothing written."""

import json

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from moe.cli import main  # noqa: E402
from moe.config import ModelConfig, MoEConfig  # noqa: E402
from moe.io.checkpoint import load_checkpoint, make_meta, save_checkpoint  # noqa: E402
from moe.model.transformer import Transformer  # noqa: E402

ATOL = 1e-4
VOCAB = 300


def _qwen2_moe(path, seed=0, **kw):
    """A saved tiny Qwen2MoeForCausalLM: 3 layers, 4 experts, top-2, a shared expert, q/k/v
    biases (random, so they count), fp32."""
    d = dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, vocab_size=VOCAB,
        max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.2,
    )  # fmt: skip
    d.update(kw)
    torch.manual_seed(seed)
    model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**d)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(path)
    return model


def _import(src, out):
    assert main(["import", str(src), "--out", str(out)]) == 0
    return load_checkpoint(out)


def _ours(ck):
    m = Transformer(ck.config).eval()
    m.load_state_dict(ck.state_dict)
    return m


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kw", [{}, {"norm_topk_prob": True, "tie_word_embeddings": True}])
def test_qwen2_moe_imports_with_transformers_logits(tmp_path, ids, kw):
    hf = _qwen2_moe(tmp_path / "hf", **kw)
    assert hf.model.layers[0].mlp.gate.weight.abs().min() > 0  # a real routing, not all ties
    ck = _import(tmp_path / "hf", tmp_path / "a")
    c, m = ck.config, ck.config.moe
    assert m.experts == ["expert0", "expert1", "expert2", "expert3"] and m.top_k == 2
    assert (m.expert_ffn_dim, m.shared_expert_ffn_dim, m.shared_expert_gate) == (32, 48, True)
    assert m.normalize_weights is bool(kw.get("norm_topk_prob"))
    assert c.qkv_bias and c.tie_embeddings is bool(kw.get("tie_word_embeddings"))
    with torch.no_grad():
        diff = (_ours(ck)(ids).logits - hf(ids).logits).abs().max().item()
    print(f"qwen2-moe import {kw}: max |logit diff| {diff:.3g}")
    assert diff <= ATOL

    # transformers 5's fused expert layout (its in-memory state dict, e.g. a de-quantized GGUF)
    fused = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused
    (tmp_path / "fused").mkdir()
    save_file(fused, str(tmp_path / "fused" / "model.safetensors"), metadata={"format": "pt"})
    hf.config.to_json_file(str(tmp_path / "fused" / "config.json"))
    assert _same(_import(tmp_path / "fused", tmp_path / "b").state_dict, ck.state_dict)


@pytest.mark.parametrize("gated,qkv_bias", [(False, False), (True, False), (True, True),
                                            (False, True)])  # fmt: skip
def test_shared_expert_moe_round_trips_through_qwen2_moe_bit_for_bit(tmp_path, gated, qkv_bias):
    cfg = ModelConfig(size="debug", qkv_bias=qkv_bias, moe=MoEConfig(
        experts=["text", "code", "dna"], top_k=2, shared_expert_ffn_dim=24,
        shared_expert_gate=gated, normalize_weights=gated))  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".bias", "shared_gate.weight")):  # not 0: make them count
                p.normal_(0.0, 0.5)
    save_checkpoint(tmp_path / "ck", model.state_dict(), cfg, make_meta(kind="moe"))
    assert main(["export", str(tmp_path / "ck"), "--out", str(tmp_path / "hf")]) == 0
    back = _import(tmp_path / "hf", tmp_path / "back")
    assert _same(back.state_dict, model.state_dict())
    b = back.config.moe
    assert (b.experts, b.shared_expert_gate, b.normalize_weights) == (cfg.moe.experts, gated, gated)
    assert back.config.qkv_bias is qkv_bias


def _refused(capsys, tmp_path, field):
    capsys.readouterr()  # save_pretrained's progress bar
    rc = main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and field in err, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"decoder_sparse_step": 2}, "decoder_sparse_step 2"),
        ({"mlp_only_layers": [0]}, "mlp_only_layers [0]"),
        ({"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0},
         "sliding_window 16"),
    ],
)  # fmt: skip
def test_dense_layers_and_sliding_windows_are_refused(tmp_path, capsys, kw, field):
    _qwen2_moe(tmp_path / "hf", **kw)
    _refused(capsys, tmp_path, field)


def test_an_ungated_export_changed_after_export_is_refused(tmp_path, capsys):
    """moe_forge_shared_expert_gate: false promises a zero gate; a trained one is not undone."""
    _qwen2_moe(tmp_path / "hf")
    hcfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    hcfg["moe_forge_shared_expert_gate"] = False
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hcfg))
    _refused(capsys, tmp_path, "moe_forge_shared_expert_gate")
