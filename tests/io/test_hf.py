"""Hugging Face interop: tiny random Llama/Mixtral models built locally (no hub access)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe.config import ConfigError, ModelConfig, MoEConfig  # noqa: E402
from moe.io.checkpoint import load_checkpoint, make_meta, read_meta, save_checkpoint  # noqa: E402
from moe.io.hf import import_hf  # noqa: E402
from moe.io.hf_export import export_hf  # noqa: E402
from moe.model.transformer import Transformer  # noqa: E402

ATOL = 1e-5


def _llama_cfg(**kw):
    d = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=259, rope_theta=10000.0, rms_norm_eps=1e-6,
    )  # fmt: skip
    d.update(kw)
    return transformers.LlamaConfig(**d)


def _save_llama(path, seed=0, **kw):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(_llama_cfg(**kw)).eval()
    model.save_pretrained(path)
    return model


def _ours(path):
    ck = load_checkpoint(path)
    m = Transformer(ck.config).eval()
    m.load_state_dict(ck.state_dict)
    return m


@pytest.fixture
def ids():
    return torch.randint(0, 259, (2, 19), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tied", [False, True])
def test_import_matches_transformers_logits(tmp_path, ids, tied):
    hf = _save_llama(tmp_path / "hf", tie_word_embeddings=tied)
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{}")
    out = import_hf(tmp_path / "hf", tmp_path / "ours")
    meta = read_meta(out)
    assert meta["kind"] == "dense" and meta["family"] is None and meta["recipe"] is None
    assert meta["hf_source"].endswith("hf")
    assert (out / "tokenizer" / "tokenizer_config.json").is_file()
    ours = _ours(out)
    assert ours.config.tie_embeddings is tied
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=0, atol=ATOL)


def test_import_sharded(tmp_path, ids):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(_llama_cfg()).eval()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        got = _ours(import_hf(tmp_path / "hf", tmp_path / "ours"))(ids).logits
        torch.testing.assert_close(got, hf(ids).logits, rtol=0, atol=ATOL)


def test_export_dense_matches_and_round_trip_is_exact(tmp_path, ids):
    _save_llama(tmp_path / "hf")
    a = import_hf(tmp_path / "hf", tmp_path / "a")
    exported = export_hf(a, tmp_path / "hf2")
    hf2 = transformers.LlamaForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf2(ids).logits, _ours(a)(ids).logits, rtol=0, atol=ATOL)
    b = import_hf(exported, tmp_path / "b")
    sa, sb = load_checkpoint(a).state_dict, load_checkpoint(b).state_dict
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
    assert load_checkpoint(a).config == load_checkpoint(b).config


def test_export_our_dense_with_byte_tokenizer(tmp_path, ids):
    cfg = ModelConfig(size="debug")
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    save_checkpoint(tmp_path / "ck", model.state_dict(), cfg, make_meta())
    out = export_hf(tmp_path / "ck", tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=ATOL)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "héllo, ACGT\x00"
    assert tok(text).input_ids == list(text.encode())  # token id = byte, like ByteTokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    assert tok.decode(list(text.encode())) == text


def test_export_moe_to_mixtral(tmp_path, ids):
    cfg = ModelConfig(size="debug", moe=MoEConfig(experts=["text", "code", "dna"], top_k=2))
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    save_checkpoint(tmp_path / "moe", model.state_dict(), cfg, make_meta(kind="moe"))
    out = export_hf(tmp_path / "moe", tmp_path / "mixtral")
    c = json.loads((out / "config.json").read_text())
    assert c["architectures"] == ["MixtralForCausalLM"] and c["num_local_experts"] == 3
    hf = transformers.MixtralForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    "moe,why",
    [
        (MoEConfig(experts=["a", "b"], router="domain"), "domain id"),
        (MoEConfig(experts=["a", "b"], top_k=2, normalize_weights=False), "renormalises"),
    ],
)
def test_export_refuses_what_mixtral_cannot_compute(tmp_path, moe, why):
    cfg = ModelConfig(size="debug", moe=moe)
    save_checkpoint(tmp_path / "ck", Transformer(cfg).state_dict(), cfg, make_meta())
    with pytest.raises(ConfigError, match=why):
        export_hf(tmp_path / "ck", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kw,why",
    [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
    ],
)
def test_import_refusals(tmp_path, kw, why):
    _save_llama(tmp_path / "hf", **kw)
    with pytest.raises(ConfigError, match=why):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_refuses_existing_out_and_other_architectures(tmp_path):
    _save_llama(tmp_path / "hf")
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="only Llama"):
        import_hf(tmp_path / "hf", tmp_path / "o2")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="pickled"):
        import_hf(tmp_path / "hf", tmp_path / "o3")


def test_import_mixtral_and_moe_round_trip(tmp_path, ids):
    torch.manual_seed(0)
    mcfg = transformers.MixtralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=259, num_local_experts=3, num_experts_per_tok=2,
    )  # fmt: skip
    hf = transformers.MixtralForCausalLM(mcfg).eval()
    hf.save_pretrained(tmp_path / "mx")
    a = import_hf(tmp_path / "mx", tmp_path / "a")
    assert read_meta(a)["kind"] == "moe"
    with torch.no_grad():
        torch.testing.assert_close(_ours(a)(ids).logits, hf(ids).logits, rtol=0, atol=ATOL)
    # our MoE (named experts) → Mixtral → ours: bitwise, names kept
    cfg = ModelConfig(size="debug", moe=MoEConfig(experts=["text", "code", "dna"], top_k=2))
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "moe", Transformer(cfg).state_dict(), cfg, make_meta(kind="moe"))
    b = import_hf(export_hf(tmp_path / "moe", tmp_path / "mx2"), tmp_path / "b")
    sa, sb = load_checkpoint(tmp_path / "moe").state_dict, load_checkpoint(b).state_dict
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert load_checkpoint(b).config.moe.experts == ["text", "code", "dna"]
