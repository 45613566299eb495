"""Hugging Face interop: import Llama-family directories (Llama incl. Llama 3 RoPE scaling,
SmolLM2, Mistral without a sliding window, Qwen2/Qwen2.5 with q/k/v biases), Mixtral MoEs,
Qwen2-MoE MoEs (a gated shared expert; moe/io/hf_qwen_moe.py) and GGUF files (de-quantized through
transformers); export to LlamaForCausalLM, Qwen2ForCausalLM (q/k/v biases), MixtralForCausalLM or
Qwen2MoeForCausalLM. Anything else is refused in one line naming the config field.

Neither direction needs `transformers` to run: configs are written as JSON and weights are renamed
tensor by tensor (transformers, the `hf` extra, is needed only to load the result). Our RoPE uses
Llama's half-split layout (rotate_half), so q/k projections map without a permutation, and our
RMSNorm/SwiGLU/GQA match Llama's, so an imported model computes the same logits.

This module imports; moe/io/hf_export.py exports, with the same names.

Names (ours ⇄ Llama):
    tok_emb.weight                  model.embed_tokens.weight
    layers.{i}.attn.w{q,k,v,o}      model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    layers.{i}.attn.w{q,k,v}.bias   model.layers.{i}.self_attn.{q,k,v}_proj.bias (Qwen2)
    layers.{i}.attn_norm.weight     model.layers.{i}.input_layernorm.weight
    layers.{i}.ffn_norm.weight      model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.ffn.w{1,3,2}.weight  model.layers.{i}.mlp.{gate,up,down}_proj.weight
    norm.weight                     model.norm.weight
    lm_head.weight                  lm_head.weight (absent when tied)
MoE with the learned router → Mixtral, in the per-expert layout every transformers version loads
(transformers 5 fuses these into experts.gate_up_proj / down_proj while loading):
    layers.{i}.ffn.router.weight (E, C)   model.layers.{i}.block_sparse_moe.gate.weight (E, C)
    layers.{i}.ffn.w1[e] (C, Fe)          ...block_sparse_moe.experts.{e}.w1.weight = w1[e].T
    layers.{i}.ffn.w3[e] (C, Fe)          ...block_sparse_moe.experts.{e}.w3.weight = w3[e].T
    layers.{i}.ffn.w2[e] (Fe, C)          ...block_sparse_moe.experts.{e}.w2.weight = w2[e].T
Mixtral's router is softmax → top-k → renormalise, which is ours with normalize_weights: true.
Qwen2-MoE's names are in moe/io/hf_export.py's docstring; moe/io/hf_qwen_moe.py reads them back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moe.config import ConfigError, ModelConfig, MoEConfig, RopeScalingConfig
from moe.data.tokenizer import tokenizer_record
from moe.io.checkpoint import (
    CheckpointError,
    make_meta,
    new_id,
    replace_dir,
    save_checkpoint,
)
from moe.io.output import claim

# Files of a tokenizer directory that import carries over and export writes back
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)  # fmt: skip
TOKENIZER_DIR = "tokenizer"

# Our byte tokenizer's specials (moe.data.tokenizer.ByteTokenizer)
BYTE_VOCAB, BYTE_BOS, BYTE_EOS, BYTE_PAD = 259, 256, 257, 258

_LAYER_MAP = {
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    # Qwen2's q/k/v biases (model.qkv_bias)
    "attn.wq.bias": "self_attn.q_proj.bias",
    "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.bias": "self_attn.v_proj.bias",
}
_TOP_MAP = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
OUR_LAYER = re.compile(r"layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)$")
_HF_EXPERT = re.compile(
    r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$"
)
_HF_GATE = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight$")


def hf_name(name: str) -> str:
    """Our dense parameter name → the Llama name."""
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = OUR_LAYER.match(name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    raise ConfigError(f"tensor {name} has no Llama equivalent")


_INV_TOP = {v: k for k, v in _TOP_MAP.items()}
_INV_LAYER = {v: k for k, v in _LAYER_MAP.items()}


def our_name(hf: str) -> str | None:
    """Llama name → ours; None for tensors that carry no weights (rotary inv_freq buffers)."""
    if hf in _INV_TOP:
        return _INV_TOP[hf]
    m = _HF_LAYER.match(hf)
    if m:
        if m.group(2) in _INV_LAYER:
            return f"layers.{m.group(1)}.{_INV_LAYER[m.group(2)]}"
        if m.group(2).endswith("rotary_emb.inv_freq"):
            return None
    raise ConfigError(f"tensor {hf} is not part of a Llama model this tool can import")


# ----------------------------------------------------------------------------- helpers


def staging_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_name(f".{out.name}.tmp-{os.getpid()}-{new_id()}")


def refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise CheckpointError(f"output {out} already exists (pass --overwrite to replace it)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: corrupted JSON ({e})") from None


# model_type → the transformers class: each computes what our model does, under the checks in
# model_config_from_hf (Mistral = Llama without a sliding window; Qwen2 = Llama with q/k/v biases)
_DENSE_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
_MOE_TYPES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


def _model_type(hf: dict[str, Any], where: Path) -> str:
    archs = hf.get("architectures") or []
    mt = hf.get("model_type")
    if mt is None:  # old configs name only the class
        by_class = {v: k for k, v in {**_DENSE_TYPES, **_MOE_TYPES}.items()}
        mt = next((by_class[a] for a in archs if a in by_class), None)
    if mt not in _DENSE_TYPES and mt not in _MOE_TYPES:
        raise ConfigError(
            f"{where}: model_type {mt!r} (architectures {archs}) is not supported; only "
            f"Llama-family models ({', '.join(_DENSE_TYPES)}) and the Mixtral and Qwen2-MoE "
            "mixtures can be imported"
        )
    return mt


def _rope(hf: dict[str, Any], where: Path) -> tuple[float, RopeScalingConfig | None]:
    """rope_theta and Llama 3 scaling from a transformers 4 (rope_theta + rope_scaling) or 5
    (rope_parameters) config; other RoPE variants are refused."""
    scaling, params = dict(hf.get("rope_scaling") or {}), dict(hf.get("rope_parameters") or {})
    p = {**params, **scaling}
    kinds = {
        "rope_scaling": scaling.get("rope_type") or scaling.get("type"),
        "rope_parameters": params.get("rope_type"),
    }
    key, kind = next(
        ((k, v) for k, v in kinds.items() if v not in (None, "default")), ("", "default")
    )
    theta = float(p.get("rope_theta") or hf.get("rope_theta") or 10000.0)
    partial = p.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise ConfigError(f"{where}: partial_rotary_factor {partial} is not supported (1.0 only)")
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ConfigError(
            f"{where}: {key}.rope_type {kind!r} is not supported (default or llama3 RoPE only)"
        )
    need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in need if p.get(k) is None]
    if missing:
        raise ConfigError(f"{where}: {key}.{missing[0]} is missing (llama3 RoPE needs it)")
    return theta, RopeScalingConfig(
        factor=float(p["factor"]),
        low_freq_factor=float(p["low_freq_factor"]),
        high_freq_factor=float(p["high_freq_factor"]),
        original_max_len=int(p["original_max_position_embeddings"]),
    )


def _check_full_attention(hf: dict[str, Any], model_type: str, where: Path) -> None:
    """Our attention sees the whole context; a sliding window is accepted only where it is a no-op
    (it covers max_position_embeddings, the longest sequence the model is given)."""
    window = hf.get("sliding_window")
    sliding = [t for t in hf.get("layer_types") or [] if t != "full_attention"]
    if model_type in ("qwen2", "qwen2_moe"):
        used = bool(hf.get("use_sliding_window")) or bool(sliding)
    else:
        used = window is not None or bool(sliding)
    context = int(hf.get("max_position_embeddings") or 2048)
    if used and (window is None or int(window) < context):
        raise ConfigError(
            f"{where}: sliding_window {window} is shorter than the context "
            f"(max_position_embeddings {context}); only full attention is supported"
        )


def model_config_from_hf(hf: dict[str, Any], where: Path) -> ModelConfig:
    """Our ModelConfig for a Llama, Mistral, Qwen2 (or Mixtral, Qwen2-MoE) config.json; refuses,
    in one line naming the field, what our model cannot compute exactly."""
    model_type = _model_type(hf, where)
    _check_full_attention(hf, model_type, where)
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConfigError(
                f"{where}: {key}: true is not supported (the only biases modelled are Qwen2's "
                "q/k/v biases)"
            )
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    dim, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    # a head size other than hidden_size / heads (a pruned model's) is kept explicitly
    head_dim = None if head_dim is None or head_dim * heads == dim else int(head_dim)
    rope_theta, rope_scaling = _rope(hf, where)
    moe, qkv_bias = MoEConfig(), model_type == "qwen2"
    if model_type == "qwen2_moe":  # moe/io/hf_qwen_moe.py
        from moe.io.hf_qwen_moe import qwen2_moe_config

        moe, qkv_bias = qwen2_moe_config(hf, where)
    if model_type == "mixtral":
        n = int(hf["num_local_experts"])
        # expert names survive a round trip through our own export; others get positional names
        names = hf.get("moe_forge_experts") or [f"expert{e}" for e in range(n)]
        moe = MoEConfig(
            experts=list(names),
            expert_ffn_dim=int(hf["intermediate_size"]),
            router="learned",
            top_k=int(hf.get("num_experts_per_tok", 2)),
            normalize_weights=True,
            load_balance_coef=float(hf.get("router_aux_loss_coef", 0.01)),
            jitter=float(hf.get("router_jitter_noise") or 0.0),
        )
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        dim=dim,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        # an MoE's only FFN size (Qwen2-MoE's dense intermediate_size is never used)
        ffn_dim=moe.expert_ffn_dim or int(hf["intermediate_size"]),
        max_seq_len=int(hf.get("max_position_embeddings") or 2048),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        qkv_bias=qkv_bias,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        moe=moe,
    ).resolved()


# ----------------------------------------------------------------------------- import


def import_hf(
    hf_dir: str | os.PathLike,
    out: str | os.PathLike,
    overwrite: bool = False,
    source: str | os.PathLike | None = None,
) -> Path:
    """Import a Hugging Face directory (config.json + safetensors) as a checkpoint: a Llama,
    Mistral or Qwen2 dense model, or a Mixtral (per-expert layout) or Qwen2-MoE (with its shared
    expert) as a learned-router MoE.
    A GGUF file (or a directory holding one) is de-quantized through transformers first. Tokenizer
    files are carried into `out/tokenizer/`. `source` is recorded as meta.hf_source (default:
    `hf_dir`). Returns `out`."""
    src, out = Path(hf_dir), Path(out)
    refuse_existing(out, overwrite)
    with claim(out, [src]):  # moe/io/output.py
        return _import(src, out, overwrite, source)


def _import(src: Path, out: Path, overwrite: bool, source: str | os.PathLike | None) -> Path:
    """`import_hf` once its output is claimed."""
    from moe.io.sources import is_hf_dir

    gguf = _gguf_file(src, is_hf_dir(src))
    if gguf is not None:
        return _import_gguf(gguf, out, overwrite)
    if not is_hf_dir(src):
        bins = src.is_dir() and any(src.glob("*.bin"))
        raise ConfigError(
            f"{src}: "
            + (
                "only safetensors weights can be imported (pickled .bin files are never loaded)"
                if bins
                else "not a Hugging Face model directory (config.json + *.safetensors)"
            )
        )
    hf, cfg, state = read_hf(src)
    meta = make_meta(
        kind="moe" if cfg.moe.experts else "dense",
        family=None,
        recipe=None,
        hf_source=str(Path(source or src).resolve()),
        hf_token_ids={k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        tokenizer=tokenizer_record(src),  # kind and content hash of the files carried below
    )
    tmp = staging_dir(out)
    try:
        save_checkpoint(tmp, state, cfg, meta)
        tok = [f for f in TOKENIZER_FILES if (src / f).is_file()]
        if tok:
            (tmp / TOKENIZER_DIR).mkdir()
            for f in tok:
                shutil.copy2(src / f, tmp / TOKENIZER_DIR / f)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_hf(src: Path) -> tuple[dict[str, Any], ModelConfig, dict[str, torch.Tensor]]:
    """A Hugging Face directory (config.json + safetensors) in memory: (its config.json, our
    ModelConfig, the weights under our names), every name and shape checked against the config.
    What `import_hf` writes; `moe assemble CONFIG.yaml` reads its inputs with it too."""
    from moe.io.sources import TensorFile, hf_weight_files

    hf = _read_json(src / "config.json")
    cfg = model_config_from_hf(hf, src / "config.json")

    files = hf_weight_files(src)
    opened: dict[Path, TensorFile] = {}

    def read(hname: str) -> torch.Tensor:
        if files[hname] not in opened:
            opened[files[hname]] = TensorFile(files[hname])
        return opened[files[hname]].read(hname)

    if _model_type(hf, src / "config.json") == "qwen2_moe":  # moe/io/hf_qwen_moe.py
        from moe.io.hf_qwen_moe import qwen2_moe_state

        state = qwen2_moe_state(hf, cfg.moe, cfg.qkv_bias, {h: read(h) for h in files}, src)
    else:
        state = _llama_state(cfg, list(files), read, src)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # tied: the head is the embedding
    shapes = _param_shapes(cfg)
    extra = sorted(set(state) - set(shapes))
    if extra:
        raise ConfigError(f"{src}: tensor {extra[0]} (our name) is not part of the model config")
    for k, shape in shapes.items():
        if k not in state:
            raise ConfigError(f"{src}: tensor {k} (our name) is missing")
        if tuple(state[k].shape) != shape:
            raise ConfigError(
                f"{src}: tensor {k} (our name) has shape {tuple(state[k].shape)}, config "
                f"implies {shape}"
            )
    return hf, cfg, state


def _llama_state(
    cfg: ModelConfig, names: list[str], read: Callable[[str], torch.Tensor], src: Path
) -> dict[str, torch.Tensor]:
    """Llama (or Mixtral) tensors `names`, read with `read`, under our names."""
    state: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}  # (layer, w) -> {e: (in, out)}
    for hname in names:
        m = _HF_EXPERT.match(hname) if cfg.moe.experts else None
        if m:
            # nn.Linear layout (out, in) → kernel layout (in, out)
            t = read(hname).T.contiguous()
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = t
            continue
        g = _HF_GATE.match(hname) if cfg.moe.experts else None
        name = f"layers.{g.group(1)}.ffn.router.weight" if g else our_name(hname)
        if name is None:
            continue
        state[name] = read(hname)
    for (layer, w), by_e in experts.items():
        E = len(cfg.moe.experts)
        if sorted(by_e) != list(range(E)):
            raise ConfigError(f"{src}: layer {layer} {w} has experts {sorted(by_e)}, expected {E}")
        state[f"layers.{layer}.ffn.{w}"] = torch.stack([by_e[e] for e in range(E)])
    return state


def _gguf_file(src: Path, hf_dir: bool) -> Path | None:
    """The GGUF file to import: `src` itself, or the one .gguf in a directory that is not a
    Hugging Face directory; None when `src` is not GGUF."""
    if src.is_file() and src.suffix == ".gguf":
        return src
    if hf_dir or not src.is_dir():
        return None
    found = sorted(src.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise ConfigError(f"{src}: holds several GGUF files ({names}); pass the one to import")
    return found[0] if found else None


def _import_gguf(gguf: Path, out: Path, overwrite: bool) -> Path:
    """De-quantize a GGUF file with transformers (`from_pretrained(dir, gguf_file=...)`) into a
    temporary Hugging Face directory, with its tokenizer, and import that."""
    try:
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ConfigError(
            f"{gguf}: importing GGUF needs transformers, gguf and accelerate "
            "(pip install 'moe-forge[hf]')"
        ) from None
    where, name = gguf.parent, gguf.name
    try:
        hf_cfg = AutoConfig.from_pretrained(where, gguf_file=name)
    except Exception as e:  # the GGUF reader's errors (unknown architecture, corrupt file, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{gguf}: cannot read as GGUF: {first}") from None
    model_config_from_hf(hf_cfg.to_dict(), gguf)  # refuse before de-quantizing every tensor
    # transformers 5 names the argument dtype, 4 torch_dtype
    kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, **{kw: torch.float32})
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".moe-gguf-", dir=out.parent) as tmp:
        # transformers refuses save_pretrained on a GGUF-loaded model: write the de-quantized
        # tensors (cloned: a tied head shares the embedding's storage) and the config ourselves
        sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        model.config.to_json_file(str(Path(tmp) / "config.json"))
        del model, sd
        try:
            tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
        except Exception as e:  # no or unconvertible tokenizer: the weights still import
            warnings.warn(f"{gguf}: tokenizer not imported ({type(e).__name__}: {e})", stacklevel=2)
        else:
            tok.save_pretrained(tmp)
        return import_hf(tmp, out, overwrite, source=gguf)


def _param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of our model for `cfg`, without allocating weights (meta device)."""
    from moe.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


__all__ = ["import_hf", "read_hf", "model_config_from_hf", "hf_name", "our_name"]
