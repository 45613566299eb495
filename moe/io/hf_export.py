"""Hugging Face export: a checkpoint → LlamaForCausalLM (dense), Qwen2ForCausalLM (q/k/v
biases), MixtralForCausalLM (MoE with the learned top-k router) or Qwen2MoeForCausalLM (MoE with a
shared expert), with its tokenizer, a model card, generation_config.json and, above
`max_shard_size`, sharded weights (moe/io/hf_files.py). The dense and Mixtral name mapping and what
is refused are described in moe/io/hf.py, which imports.

Qwen2-MoE (a shared expert), per layer i, in the per-expert layout transformers 4 loads as is and
transformers 5 fuses on load:
    layers.{i}.ffn.router.weight (E, D)   model.layers.{i}.mlp.gate.weight
    layers.{i}.ffn.w{1,3,2}[e]            ...mlp.experts.{e}.{gate,up,down}_proj.weight (transposed)
    layers.{i}.ffn.shared.w{1,3,2}.weight ...mlp.shared_expert.{gate,up,down}_proj.weight
    layers.{i}.ffn.shared_gate.weight     ...mlp.shared_expert_gate.weight (1, D)
Qwen2-MoE always gates its shared expert: y = Σ_k p_k E_k(x) + σ(g·x) S(x). Our gated shared expert
(moe.shared_expert_gate) is exactly that. An ungated one (always on, weight 1) is written with
g = 0 and the down projection doubled: σ(0) · (2 W2) h = 0.5 · 2 · W2 h, and scaling by a power of
two is exact in floating point, so the exported model computes ours bit for bit in that term.
Qwen2-MoE's attention has q/k/v biases; a model without them is written with zero biases.
`norm_topk_prob` carries normalize_weights (Mixtral always renormalises). The config's
moe_forge_experts, moe_forge_shared_expert_gate and moe_forge_qkv_bias (ignored by transformers)
let `moe import` (moe/io/hf_qwen_moe.py) read the result back bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from moe.config import ConfigError, ModelConfig
from moe.io.checkpoint import load_checkpoint, replace_dir
from moe.io.hf import (
    BYTE_BOS,
    BYTE_EOS,
    BYTE_PAD,
    BYTE_VOCAB,
    OUR_LAYER,
    TOKENIZER_DIR,
    TOKENIZER_FILES,
    hf_name,
    refuse_existing,
    staging_dir,
)
from moe.io.hf_files import (
    DEFAULT_MAX_SHARD_SIZE,
    model_card,
    parse_size,
    save_weights,
    study_row,
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
    """config.json for LlamaForCausalLM (dense), Qwen2ForCausalLM (dense with q/k/v biases),
    MixtralForCausalLM (MoE, learned router) or Qwen2MoeForCausalLM (MoE with a shared expert)."""
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
    if m.shared_expert_ffn_dim > 0:
        fe = m.expert_ffn_dim or cfg.ffn_dim
        c.update(
            architectures=["Qwen2MoeForCausalLM"],
            model_type="qwen2_moe",
            intermediate_size=fe,  # the dense MLP of mlp_only_layers (there are none)
            moe_intermediate_size=fe,
            shared_expert_intermediate_size=m.shared_expert_ffn_dim,
            num_experts=len(m.experts),
            num_experts_per_tok=m.top_k,
            norm_topk_prob=m.normalize_weights,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            qkv_bias=True,  # zero biases when ours has none (transformers 4 always has them)
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=cfg.n_layers,
            router_aux_loss_coef=m.load_balance_coef,
            output_router_logits=False,
            moe_forge_experts=list(m.experts),
            moe_forge_shared_expert_gate=m.shared_expert_gate,
            moe_forge_qkv_bias=cfg.qkv_bias,  # import drops the zero biases written for none
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
    if m.router != "learned":
        raise ConfigError(
            f"{path}: cannot export router={m.router!r} to Mixtral: it routes by each sequence's "
            "domain id, which a transformers model is never given (export a learned-router MoE)"
        )
    if m.shared_expert_ffn_dim > 0:
        return  # Qwen2-MoE: q/k/v biases and either normalize_weights are exact there
    if cfg.qkv_bias:
        raise ConfigError(
            f"{path}: cannot export qkv_bias: true to Mixtral, whose attention has no biases"
        )
    if m.scoring != "softmax":
        raise ConfigError(f"{path}: cannot export moe.scoring={m.scoring} to Mixtral, whose router "
                          "scores experts by a softmax")
    if m.bias_update_rate > 0:
        raise ConfigError(f"{path}: cannot export moe.bias_update_rate > 0 to Mixtral: the "
                          "aux-free balancing bias changes which experts are chosen, and "
                          "Mixtral's router has no bias")
    if not m.normalize_weights:
        raise ConfigError(
            f"{path}: cannot export normalize_weights: false to Mixtral, whose router always "
            "renormalises the top-k weights"
        )


def hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict → HF names (Llama, Mixtral's per-expert layout for MoE, Qwen2-MoE's for an
    MoE with a shared expert)."""
    if cfg.moe.experts and cfg.moe.shared_expert_ffn_dim > 0:
        return _qwen2_moe_state_dict(cfg, sd)
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


_QWEN_FFN = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _qwen2_moe_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen2-MoE names (module docstring): zero q/k/v biases when ours has none; an ungated shared
    expert as gate 0 with its down projection doubled."""
    out: dict[str, torch.Tensor] = {}
    gated = cfg.moe.shared_expert_gate
    for name, t in sd.items():
        m = OUR_LAYER.match(name)
        if not (m and m.group(2).startswith("ffn.")):
            out[hf_name(name)] = t
            if m and m.group(2) == "attn.wv.weight" and not cfg.qkv_bias:
                for w in ("wq", "wk", "wv"):
                    rows = sd[f"layers.{m.group(1)}.attn.{w}.weight"].shape[0]
                    out[hf_name(f"layers.{m.group(1)}.attn.{w}.bias")] = t.new_zeros(rows)
            continue
        i, rest = m.group(1), m.group(2).removeprefix("ffn.")
        pre = f"model.layers.{i}.mlp"
        if rest == "router.weight":
            out[f"{pre}.gate.weight"] = t
        elif rest in _QWEN_FFN:
            for e in range(t.shape[0]):
                out[f"{pre}.experts.{e}.{_QWEN_FFN[rest]}.weight"] = t[e].T.contiguous()
        elif rest.removeprefix("shared.").removesuffix(".weight") in _QWEN_FFN:
            w = rest.removeprefix("shared.").removesuffix(".weight")
            double = w == "w2" and not gated  # sigmoid(0) = 1/2 takes half back (exactly)
            out[f"{pre}.shared_expert.{_QWEN_FFN[w]}.weight"] = t * 2 if double else t
            if w == "w2" and not gated:
                out[f"{pre}.shared_expert_gate.weight"] = t.new_zeros(1, t.shape[0])
        elif rest == "shared_gate.weight":
            out[f"{pre}.shared_expert_gate.weight"] = t
        else:
            raise ConfigError(f"tensor {name} has no Qwen2-MoE equivalent")
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


def export_hf(ckpt: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Export a checkpoint as a Hugging Face directory: dense → LlamaForCausalLM (with q/k/v
    biases: Qwen2ForCausalLM), MoE with the learned top-k router → MixtralForCausalLM, or
    Qwen2MoeForCausalLM when it has a shared expert. Tokenizer: the one carried in at import, else
    the byte tokenizer when the vocabulary is the byte vocabulary. Weights above `max_shard_size`
    are sharded; a model card (README.md) and generation_config.json are written. Returns `out`."""
    from moe.io.sources import resolve_input

    path, out = resolve_input(ckpt), Path(out)
    parse_size(max_shard_size)  # a bad size before any work
    refuse_existing(out, overwrite)
    with claim(out, [path]):  # moe/io/output.py
        ck = load_checkpoint(path)
        carried = path / TOKENIZER_DIR
        meta = ck.meta
        if meta.get("study") is None:
            row = study_row(path)
            meta = meta if row is None else {**meta, "study": row}
        return write_hf(out, ck.config, ck.state_dict, meta, path,
                        tokenizer=carried if carried.is_dir() else None,
                        max_shard_size=max_shard_size)  # fmt: skip


def write_hf(out: Path, config: ModelConfig, state_dict: dict[str, torch.Tensor],
             meta: dict[str, Any], where: Path, tokenizer: Path | None = None,
             max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:  # fmt: skip
    """Write a model (our config, state dict and meta) as a Hugging Face directory at `out`,
    staged and renamed into place (the caller holds `out`'s claim). `where` names the model in
    errors; `tokenizer`: a directory whose tokenizer files (moe.io.hf.TOKENIZER_FILES) are copied
    (else the byte tokenizer for the byte vocabulary)."""
    cfg = config.resolved()
    _check_exportable(cfg, where)
    tensors = hf_state_dict(cfg, state_dict)
    hfc = hf_config(cfg, meta, _dtype_name(state_dict))
    tmp = staging_dir(out)
    tmp.mkdir()
    try:
        save_weights(tensors, tmp, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(hfc, indent=2) + "\n")
        gen = {k: hfc[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        gen["_from_model_config"] = True
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(cfg, meta, hfc["architectures"][0]))
        if tokenizer is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer) / name).is_file():
                    shutil.copy2(Path(tokenizer) / name, tmp / name)
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


__all__ = ["export_hf", "hf_config", "hf_state_dict", "write_hf"]
