"""Hugging Face export: a checkpoint → LlamaForCausalLM (dense), Qwen2ForCausalLM (q/k/v
biases) or MixtralForCausalLM (MoE with the learned top-k router), with its tokenizer. The name
mapping and what is refused are described in moe/io/hf.py, which imports.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moe.config import ConfigError, ModelConfig
from moe.io.checkpoint import load_checkpoint, replace_dir
from moe.io.hf import (
    BYTE_BOS,
    BYTE_EOS,
    BYTE_PAD,
    BYTE_VOCAB,
    OUR_LAYER,
    TOKENIZER_DIR,
    hf_name,
    refuse_existing,
    staging_dir,
)
from moe.io.output import claim


def _dtype_name(sd: dict[str, torch.Tensor]) -> str:
    return str(next(iter(sd.values())).dtype).removeprefix("torch.")


def _token_ids(cfg: ModelConfig, meta: dict[str, Any]) -> dict[str, int | None]:
    """Special token ids: the imported model's own, else the byte tokenizer's."""
    ids = meta.get("hf_token_ids")
    if isinstance(ids, dict):
        return {k: ids.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if cfg.vocab_size == BYTE_VOCAB:
        return {"bos_token_id": BYTE_BOS, "eos_token_id": BYTE_EOS, "pad_token_id": BYTE_PAD}
    return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def hf_config(cfg: ModelConfig, meta: dict[str, Any], dtype: str) -> dict[str, Any]:
    """config.json for LlamaForCausalLM (dense), Qwen2ForCausalLM (dense with q/k/v biases) or
    MixtralForCausalLM (MoE, learned router)."""
    c: dict[str, Any] = {
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_size(),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 4 reads rope_theta (+ rope_scaling), transformers 5 rope_parameters
        "rope_theta": cfg.rope_theta,
        "rope_parameters": _rope_parameters(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "vocab_size": cfg.vocab_size,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
        **_token_ids(cfg, meta),
    }
    if cfg.rope_scaling is not None:
        c["rope_scaling"] = {k: v for k, v in c["rope_parameters"].items() if k != "rope_theta"}
    m = cfg.moe
    if not m.experts and cfg.qkv_bias:
        c.update(
            architectures=["Qwen2ForCausalLM"],
            model_type="qwen2",
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=cfg.n_layers,
        )
        return c
    if not m.experts:
        c.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            attention_bias=False,
            mlp_bias=False,
            pretraining_tp=1,
        )
        return c
    c.update(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        intermediate_size=m.expert_ffn_dim or cfg.ffn_dim,
        num_local_experts=len(m.experts),
        num_experts_per_tok=m.top_k,
        router_aux_loss_coef=m.load_balance_coef,
        router_jitter_noise=0.0,
        output_router_logits=False,
        sliding_window=None,
        moe_forge_experts=list(m.experts),  # ignored by transformers; restores names on import
    )
    return c


def _rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    rs = cfg.rope_scaling
    if rs is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {
        "rope_type": "llama3",
        "rope_theta": cfg.rope_theta,
        "factor": rs.factor,
        "low_freq_factor": rs.low_freq_factor,
        "high_freq_factor": rs.high_freq_factor,
        "original_max_position_embeddings": rs.original_max_len,
    }


def _check_exportable(cfg: ModelConfig, path: Path) -> None:
    if cfg.n_heads == 0:
        raise ConfigError(f"{path}: cannot export a model with no attention heads (every head "
                          "was pruned): a Llama layer has at least one")  # fmt: skip
    m = cfg.moe
    if not m.experts:
        return
    if cfg.qkv_bias:
        raise ConfigError(
            f"{path}: cannot export qkv_bias: true to Mixtral, whose attention has no biases"
        )
    if m.router != "learned":
        raise ConfigError(
            f"{path}: cannot export router={m.router!r} to Mixtral: it routes by each sequence's "
            "domain id, which a transformers model is never given (export a learned-router MoE)"
        )
    if m.shared_expert_ffn_dim > 0:
        raise ConfigError(
            f"{path}: cannot export a shared expert: Mixtral has none, and the formats that do "
            "(Qwen2-MoE) gate it with a sigmoid, so neither computes this model exactly"
        )
    if not m.normalize_weights:
        raise ConfigError(
            f"{path}: cannot export normalize_weights: false to Mixtral, whose router always "
            "renormalises the top-k weights"
        )


def hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict → HF names (Llama, or Mixtral's per-expert layout for MoE)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        m = OUR_LAYER.match(name)
        if cfg.moe.experts and m and m.group(2).startswith("ffn."):
            i, rest = m.group(1), m.group(2)
            pre = f"model.layers.{i}.block_sparse_moe"
            if rest == "ffn.router.weight":
                out[f"{pre}.gate.weight"] = t
            elif rest in ("ffn.w1", "ffn.w3", "ffn.w2"):
                w = rest.removeprefix("ffn.")
                for e in range(t.shape[0]):
                    # kernel layout (in, out) → nn.Linear layout (out, in)
                    out[f"{pre}.experts.{e}.{w}.weight"] = t[e].T.contiguous()
            else:
                raise ConfigError(f"tensor {name} has no Mixtral equivalent")
            continue
        out[hf_name(name)] = t
    return out


def _byte_tokenizer(out: Path) -> bool:
    """Write a `tokenizers` byte-level tokenizer equal to ByteTokenizer (ids 0..255 = bytes,
    <s>=256, </s>=257, <pad>=258). False when the tokenizers package is missing."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        return False
    # ByteLevel maps each byte to a printable character; give that character the byte's id
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_char = {b: c for b, c in zip(range(256), _bytes_to_unicode())}
    assert set(byte_char.values()) == set(alphabet)
    vocab = {byte_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>"]
    tok.add_special_tokens(specials)
    tok.save(str(out / "tokenizer.json"))
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, indent=2) + "\n"
    )
    return True


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte → printable character table (the one ByteLevel uses), by byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1))
    keep += list(range(0xAE, 0xFF + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def export_hf(ckpt: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Export a checkpoint as a Hugging Face directory: dense → LlamaForCausalLM (with q/k/v
    biases: Qwen2ForCausalLM), MoE with the learned top-k router → MixtralForCausalLM. Tokenizer:
    the one carried in at import, else the byte tokenizer when the vocabulary is the byte
    vocabulary. Returns `out`."""
    from moe.io.sources import resolve_input

    path, out = resolve_input(ckpt), Path(out)
    refuse_existing(out, overwrite)
    with claim(out, [path]):  # moe/io/output.py
        return _export(path, out)


def _export(path: Path, out: Path) -> Path:
    """`export_hf` once its output is claimed."""
    ck = load_checkpoint(path)
    cfg = ck.config.resolved()
    _check_exportable(cfg, path)
    tensors = hf_state_dict(cfg, ck.state_dict)
    config = hf_config(cfg, ck.meta, _dtype_name(ck.state_dict))
    tmp = staging_dir(out)
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        carried = path / TOKENIZER_DIR
        if carried.is_dir():
            for f in carried.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        elif cfg.vocab_size == BYTE_VOCAB and not _byte_tokenizer(tmp):
            (tmp / "TOKENIZER.md").write_text(
                "This model uses moe-forge's byte tokenizer: token id = byte value (0-255), "
                "BOS=256, EOS=257, PAD=258. Install `tokenizers` and export again to get "
                "tokenizer.json.\n"
            )
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["export_hf", "hf_config", "hf_state_dict"]
