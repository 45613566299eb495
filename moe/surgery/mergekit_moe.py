"""`moe assemble CONFIG.yaml --out DIR`: an MoE from dense fine-tunes of one base, configured as
mergekit-moe configures it (arcee-ai/mergekit, docs/moe.md).

    base_model: path/to/base              # donor of every non-FFN weight (attention, norms,
    gate_mode: hidden                     #   embeddings, head); hidden | cheap_embed | random
    dtype: bfloat16                       # output dtype (default: the base's)
    experts_per_token: 2
    experts:                              # each expert's FFN becomes one routed expert
      - source_model: path/to/finetune_a
        positive_prompts: ["..."]
        negative_prompts: ["..."]         # optional
        residual_scale: 1.0               # optional: scales the expert's down projection
    shared_experts:                       # optional, at most one (→ Qwen2-MoE)
      - source_model: path/to/finetune_s
        positive_prompts: ["..."]         # optional: with prompts (or gate_mode random) the
        residual_scale: 0.1               #   shared expert gets a sigmoid gate
    lineage_tolerance: 0.5                # ours: the weight lineage test below

Inputs are Hugging Face directories (Llama, Mistral, Qwen2) or moe-forge dense checkpoints. The
output follows the base model: a Hugging Face MixtralForCausalLM directory (Qwen2MoeForCausalLM
with a shared expert) for a Hugging Face base, else a moe-forge checkpoint (and, with `hf_out`,
its Hugging Face export beside it).

Lineage is tested on the weights, never on metadata: for every non-FFN matrix W (embedding,
head, attention projections) of each expert, d = ‖W − W_base‖_F / ‖W_base‖_F; the expert is of
the base's lineage when max d ≤ lineage_tolerance (default 0.5). Fine-tunes move these matrices
by a few percent of their norm; two independently trained (or initialised) models of one
architecture are ≈ √2 apart (‖a − b‖² = ‖a‖² + ‖b‖² for uncorrelated weights of equal norm).
Vectors (norm gains, biases) are skipped: every model's RMSNorm gains start at 1.

Gate rows (layers, E, D), as mergekit computes them on the base model:
    hidden       per prompt, the residual stream entering layer l at the prompt's last token
                 (BOS + prompt); h_l = mean over positive prompts − mean over negative prompts;
                 row_l = h_l / max(‖h_l‖, 1e-8)
    cheap_embed  s = Σ token embeddings over every token of every positive prompt (BOS
                 included), e = s / ‖s‖; minus the same for the negative prompts, normalised
                 again; the same row at every layer
    random       standard normal entries (seeded by `seed`)
A shared expert with prompts (or any shared expert under gate_mode random) gets Qwen2-MoE's
sigmoid gate with a row computed the same way; without prompts it is always on (weight 1).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.data.tokenizer import ByteTokenizer, HFTokenizer, carried_tokenizer, check_same_tokenizer
from moe.io.checkpoint import (
    check_weights,
    is_checkpoint,
    load_checkpoint,
    make_meta,
    save_checkpoint,
)
from moe.io.hf import read_hf, refuse_existing
from moe.io.hf_export import write_hf
from moe.io.hf_files import DEFAULT_MAX_SHARD_SIZE, parse_size
from moe.io.output import claim
from moe.io.sources import describe_problem, is_hf_dir, resolve_input
from moe.model.transformer import Transformer

GATE_MODES = ("hidden", "cheap_embed", "random")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ARCHITECTURES = ("mixtral", "qwen")
DEFAULT_LINEAGE_TOLERANCE = 0.5
_TOP_KEYS = ("base_model", "gate_mode", "dtype", "experts_per_token", "experts", "shared_experts",
             "architecture", "lineage_tolerance")  # fmt: skip
_EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "residual_scale", "name")
# configs that must agree for the non-FFN weights of the base to serve every expert's FFN
_ARCH_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size",
                "tie_embeddings", "qkv_bias", "rope_theta", "rope_scaling", "norm_eps")  # fmt: skip


@dataclass
class ExpertSpec:
    source_model: str
    positive_prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    residual_scale: float | None = None
    name: str | None = None  # ours: the expert's name (default: from the source)


@dataclass
class MoEAssemblyConfig:
    base_model: str
    experts: list[ExpertSpec]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[ExpertSpec] = field(default_factory=list)
    architecture: str | None = None
    lineage_tolerance: float = DEFAULT_LINEAGE_TOLERANCE
    path: Path = Path("moe.yaml")  # the file it was read from (named in errors)
    raw: dict[str, Any] = field(default_factory=dict)  # as written, for the output's meta/card


# ----------------------------------------------------------------------------- config


def _prompts(v: Any, where: str) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
        raise ConfigError(f"{where}: expected a list of strings")
    for i, p in enumerate(v):
        if not p:
            raise ConfigError(f"{where}[{i}]: an empty prompt tokenizes to nothing")
    return list(v)


def _known_keys(d: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}: unknown key (expected {', '.join(allowed)})")


def _model_dir(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}: expected a model directory")
    return v


def _expert(d: Any, where: str) -> ExpertSpec:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping with source_model")
    _known_keys(d, _EXPERT_KEYS, f"{where}.")
    src = _model_dir(d.get("source_model"), f"{where}.source_model")
    scale = d.get("residual_scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ConfigError(f"{where}.residual_scale: expected a number, got {scale!r}")
    name = d.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise ConfigError(f"{where}.name: expected a non-empty string")
    return ExpertSpec(src, _prompts(d.get("positive_prompts"), f"{where}.positive_prompts"),
                      _prompts(d.get("negative_prompts"), f"{where}.negative_prompts"),
                      None if scale is None else float(scale), name)  # fmt: skip


def load_moe_config(path: str | os.PathLike) -> MoEAssemblyConfig:
    """Read and check a mergekit-moe YAML; every mistake is one line naming the field and file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{path}: not a readable YAML file ({first})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping (base_model:, experts:, ...)")
    _known_keys(raw, _TOP_KEYS, f"{path}: ")
    base = _model_dir(raw.get("base_model"), f"{path}: base_model")
    if not isinstance(raw.get("experts"), list) or not raw["experts"]:
        raise ConfigError(f"{path}: experts: expected a list of at least one expert")
    experts = [_expert(e, f"{path}: experts[{i}]") for i, e in enumerate(raw["experts"])]
    shared_raw = raw.get("shared_experts") or []
    if not isinstance(shared_raw, list):
        raise ConfigError(f"{path}: shared_experts: expected a list")
    shared = [_expert(e, f"{path}: shared_experts[{i}]") for i, e in enumerate(shared_raw)]
    if len(shared) > 1:
        raise ConfigError(f"{path}: shared_experts: at most one shared expert, got {len(shared)}")
    mode = raw.get("gate_mode", "hidden")
    if mode not in GATE_MODES:
        raise ConfigError(f"{path}: gate_mode: {mode!r} is not one of {', '.join(GATE_MODES)}")
    dtype = raw.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"{path}: dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    k = raw.get("experts_per_token", 2)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(experts):
        raise ConfigError(f"{path}: experts_per_token: must be between 1 and the number of "
                          f"experts ({len(experts)}), got {k!r}")  # fmt: skip
    arch = raw.get("architecture")
    if arch is not None and arch not in ARCHITECTURES:
        raise ConfigError(f"{path}: architecture: {arch!r} is not one of "
                          f"{', '.join(ARCHITECTURES)}")  # fmt: skip
    if arch == "mixtral" and shared:
        raise ConfigError(f"{path}: architecture: mixtral has no shared expert (use qwen)")
    if arch == "qwen" and not shared:
        raise ConfigError(f"{path}: architecture: qwen needs one shared_experts entry")
    tol = raw.get("lineage_tolerance", DEFAULT_LINEAGE_TOLERANCE)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ConfigError(f"{path}: lineage_tolerance: expected a number > 0, got {tol!r}")
    if mode != "random":
        for i, e in enumerate(experts):
            if not e.positive_prompts:
                raise ConfigError(f"{path}: experts[{i}].positive_prompts: gate_mode {mode} "
                                  "needs at least one prompt per expert")  # fmt: skip
        sets = {(tuple(e.positive_prompts), tuple(e.negative_prompts)) for e in experts}
        if len(experts) > 1 and len(sets) == 1:
            raise ConfigError(f"{path}: experts: every expert has the same prompts, so every "
                              "gate row would be the same; give each expert its own prompts")
    return MoEAssemblyConfig(base, experts, mode, dtype, k, shared, arch, float(tol), path, raw)


# ----------------------------------------------------------------------------- inputs


@dataclass
class _Input:
    path: Path
    kind: str  # "hf" | "moe"
    config: ModelConfig
    state: dict[str, torch.Tensor]
    meta: dict[str, Any] | None = None  # moe-forge checkpoints only
    hf_config: dict[str, Any] | None = None  # Hugging Face directories only


def _open(spec: str, where: str, cache: dict[Path, _Input]) -> _Input:
    problem = describe_problem(spec)
    if problem:
        hint = "" if Path(spec).exists() else " (hub names are not downloaded: fetch it first)"
        raise ConfigError(f"{where}: {problem}{hint}")
    p = resolve_input(spec)
    key = p.resolve()
    if key not in cache:
        if is_checkpoint(p):
            ck = load_checkpoint(p)
            inp = _Input(p, "moe", ck.config.resolved(), ck.state_dict, meta=ck.meta)
        else:
            hf, cfg, state = read_hf(p)
            inp = _Input(p, "hf", cfg, state, hf_config=hf)
        if inp.config.moe.experts:
            raise ConfigError(f"{where}: {p} is an MoE; experts are dense models")
        cache[key] = inp
    return cache[key]


def _check_architecture(base: _Input, other: _Input, where: str) -> None:
    for f in _ARCH_FIELDS:
        a, b = getattr(other.config, f), getattr(base.config, f)
        if a != b:
            raise ConfigError(f"{where}: {other.path} has {f} {a} but base_model {base.path} has "
                              f"{b}; experts must share the base's architecture")  # fmt: skip


def lineage_distance(base: dict[str, torch.Tensor], other: dict[str, torch.Tensor]
                     ) -> tuple[float, str]:  # fmt: skip
    """(max over non-FFN matrices of ‖W − W_base‖_F / ‖W_base‖_F, the matrix that attains it)."""
    worst, name = 0.0, ""
    for k, w in base.items():
        if ".ffn." in k or w.dim() < 2:
            continue
        ref = w.double()
        diff = float((other[k].double() - ref).norm())
        scale = float(ref.norm())
        d = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
        if d > worst or not name:
            worst, name = d, k
    return worst, name


# ----------------------------------------------------------------------------- gates


def _prompt_ids(tok, prompt: str, max_len: int, where: str) -> list[int]:
    ids = tok.encode(prompt)
    if not ids:
        raise ConfigError(f"{where}: {prompt!r} tokenizes to no tokens")
    ids = ([tok.bos_id] if getattr(tok, "has_bos", True) else []) + list(ids)
    if len(ids) > max_len:
        raise ConfigError(f"{where}: {prompt[:30]!r}... is {len(ids)} tokens, longer than the "
                          f"model's context ({max_len})")  # fmt: skip
    return ids


def layer_inputs(model: Transformer, ids: list[int]) -> torch.Tensor:
    """The residual stream entering every block at the last position: (layers, D), float64."""
    got: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: got.append(args[0][0, -1].double()))
             for b in model.layers]  # fmt: skip
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(got)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def gate_rows(model: Transformer, tok, prompt_sets: list[tuple[list[str], list[str]]],
              mode: str, where: list[str]) -> torch.Tensor:  # fmt: skip
    """(layers, N, D) rows for N (positive, negative) prompt sets: see the module docstring."""
    L, D = model.config.n_layers, model.config.dim
    model.eval()

    def one(prompts: list[str], at: str) -> torch.Tensor:  # (layers, D)
        ids = [_prompt_ids(tok, p, model.config.max_seq_len, f"{at}[{i}]")
               for i, p in enumerate(prompts)]  # fmt: skip
        if mode == "hidden":
            return torch.stack([layer_inputs(model, x) for x in ids]).mean(0)
        emb = model.tok_emb.weight.detach().double()
        s = sum(emb[torch.tensor(x)].sum(0) for x in ids)
        return _unit(s).expand(L, D)

    rows = []
    for (pos, neg), at in zip(prompt_sets, where):
        h = one(pos, f"{at}.positive_prompts")
        if neg:
            h = h - one(neg, f"{at}.negative_prompts")
        rows.append(_unit(h))
    return torch.stack(rows, dim=1).float()  # (layers, N, D)


# ----------------------------------------------------------------------------- assembly


@dataclass
class Assembled:
    config: ModelConfig
    state: dict[str, torch.Tensor]
    meta: dict[str, Any]
    base: _Input
    sources: list[_Input]  # base, experts, shared expert (the inputs, in that order)


def _names(cfg: MoEAssemblyConfig, inputs: list[_Input]) -> list[str]:
    names = []
    for i, (e, inp) in enumerate(zip(cfg.experts, inputs)):
        meta = inp.meta or {}
        names.append(e.name or meta.get("domain") or meta.get("family") or inp.path.name or
                     f"expert{i}")  # fmt: skip
    if len(set(names)) < len(names):
        names = [f"{n}-{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
    return names


def build_moe(cfg: MoEAssemblyConfig, seed: int = 0) -> Assembled:
    """The assembled MoE in memory (config, state dict, meta): see the module docstring."""
    where = str(cfg.path)
    cache: dict[Path, _Input] = {}
    base = _open(cfg.base_model, f"{where}: base_model", cache)
    experts = [_open(e.source_model, f"{where}: experts[{i}].source_model", cache)
               for i, e in enumerate(cfg.experts)]  # fmt: skip
    shared = [_open(e.source_model, f"{where}: shared_experts[{i}].source_model", cache)
              for i, e in enumerate(cfg.shared_experts)]  # fmt: skip
    labelled = [(f"experts[{i}]", x) for i, x in enumerate(experts)] + [
        (f"shared_experts[{i}]", x) for i, x in enumerate(shared)]
    lineage = {}
    for label, x in labelled:
        at = f"{where}: {label}.source_model"
        _check_architecture(base, x, at)
        if label.startswith("experts") and x.config.ffn_dim != experts[0].config.ffn_dim:
            raise ConfigError(f"{at}: {x.path} has ffn_dim {x.config.ffn_dim} but experts[0] has "
                              f"{experts[0].config.ffn_dim}; routed experts share one size")
        d, tensor = lineage_distance(base.state, x.state)
        if d > cfg.lineage_tolerance:
            raise ConfigError(
                f"{at}: {x.path} is not a fine-tune of base_model {base.path}: its {tensor} is "
                f"{d:.3g} of the base's norm away (lineage_tolerance {cfg.lineage_tolerance:g}); "
                "experts must come from one base"
            )
        lineage[label] = round(d, 6)
    check_same_tokenizer([(x.path, x.config.vocab_size) for x in [base, *experts, *shared]],
                         "assemble")  # fmt: skip
    names = _names(cfg, experts)
    s_spec = cfg.shared_experts[0] if shared else None
    gated = s_spec is not None and (cfg.gate_mode == "random" or bool(s_spec.positive_prompts))
    L, D = base.config.n_layers, base.config.dim
    n_rows = len(experts) + (1 if gated else 0)
    if cfg.gate_mode == "random":
        rows = torch.randn(L, n_rows, D, generator=torch.Generator().manual_seed(seed))
    else:
        tok = _tokenizer(base)
        specs = list(cfg.experts) + ([s_spec] if gated else [])
        labels = [f"{where}: experts[{i}]" for i in range(len(experts))]
        labels += [f"{where}: shared_experts[0]"] if gated else []
        model = Transformer.from_state(base.config, {k: v.float() for k, v in base.state.items()})
        rows = gate_rows(model, tok, [(s.positive_prompts, s.negative_prompts) for s in specs],
                         cfg.gate_mode, labels)  # fmt: skip
    fs = shared[0].config.ffn_dim if shared else 0
    moe_cfg = MoEConfig(experts=names, expert_ffn_dim=experts[0].config.ffn_dim, router="learned",
                        top_k=cfg.experts_per_token, shared_expert_ffn_dim=fs,
                        shared_expert_gate=gated, normalize_weights=True)  # fmt: skip
    out_cfg = dataclasses.replace(base.config, ffn_dim=experts[0].config.ffn_dim, moe=moe_cfg)
    dtype = DTYPES[cfg.dtype] if cfg.dtype else next(iter(base.state.values())).dtype
    state = {k: v for k, v in base.state.items() if ".ffn." not in k}
    for li in range(L):
        pre = f"layers.{li}.ffn"
        for w in ("w1", "w3", "w2"):
            parts = []
            for spec, x in zip(cfg.experts, experts):
                t = x.state[f"{pre}.{w}.weight"].double()
                if w == "w2" and spec.residual_scale is not None:
                    t = t * spec.residual_scale
                parts.append(t.T)  # nn.Linear (out, in) → kernel layout (in, out)
            state[f"{pre}.{w}"] = torch.stack(parts)
        state[f"{pre}.router.weight"] = rows[li, : len(experts)]
        if shared:
            for w in ("w1", "w3", "w2"):
                t = shared[0].state[f"{pre}.{w}.weight"].double()
                if w == "w2" and s_spec.residual_scale is not None:
                    t = t * s_spec.residual_scale
                state[f"{pre}.shared.{w}.weight"] = t
            if gated:
                state[f"{pre}.shared_gate.weight"] = rows[li, len(experts):]  # (1, D)
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    check_weights(state, out_cfg, cfg.path)  # names and shapes are the config's
    metas = [x.meta for x in [base, *experts, *shared] if x.meta]
    parents = list(dict.fromkeys(m["id"] for m in metas if m.get("id")))
    bmeta = base.meta or {}
    # the shared ancestry (the base) counted once, plus what each fine-tune added to it
    tokens = float(bmeta.get("tokens_seen", 0)) + sum(
        max(0.0, float(x.meta.get("tokens_seen", 0)) - float(bmeta.get("tokens_seen", 0)))
        for x in [*experts, *shared] if x.meta)  # fmt: skip
    flops = float(bmeta.get("train_flops", 0.0)) + sum(
        max(0.0, float(x.meta.get("train_flops", 0.0)) - float(bmeta.get("train_flops", 0.0)))
        for x in [*experts, *shared] if x.meta)  # fmt: skip
    meta = make_meta(
        parents=parents,
        base_id=bmeta.get("base_id") or bmeta.get("id"),
        kind="moe",
        tokens_seen=int(tokens),
        train_flops=flops,
        recipe=bmeta.get("recipe"),
        assembled=dict(method="mergekit-moe", config=cfg.raw, experts=names,
                       gate_mode=cfg.gate_mode, shared_expert_gate=gated, seed=seed,
                       lineage_distance=lineage),  # fmt: skip
    )
    if base.kind == "hf":
        meta["hf_token_ids"] = {k: (base.hf_config or {}).get(k)
                                for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    elif "hf_token_ids" in bmeta:
        meta["hf_token_ids"] = bmeta["hf_token_ids"]
    return Assembled(out_cfg, state, meta, base, [base, *experts, *shared])


def _tokenizer(base: _Input):
    """The base model's tokenizer (to read the prompts)."""
    carried = carried_tokenizer(base.path, base.config.vocab_size)
    if carried is None:
        raise ConfigError(f"base_model {base.path} has no tokenizer to read the prompts with "
                          "(add its tokenizer files, or use gate_mode: random)")  # fmt: skip
    return carried if isinstance(carried, ByteTokenizer) else HFTokenizer(carried)


def _tokenizer_dir(x: _Input) -> Path | None:
    """Where the tokenizer files an output carries lie (None: the byte tokenizer or none)."""
    c = carried_tokenizer(x.path, x.config.vocab_size)
    return c if isinstance(c, Path) else None


def assemble_from_config(
    config: str | os.PathLike,
    out: str | os.PathLike,
    *,
    hf_out: str | os.PathLike | None = None,
    seed: int = 0,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Assemble the MoE a mergekit-moe YAML describes into `out`: a Hugging Face directory when
    base_model is one, else a moe-forge checkpoint (and its Hugging Face export at `hf_out`).
    Nothing is written when any input or prompt is refused. Returns `out`."""
    cfg = load_moe_config(config)
    out = Path(out)
    parse_size(max_shard_size)
    refuse_existing(out, overwrite)
    if hf_out is not None:
        if is_hf_dir(resolve_input(cfg.base_model)):
            raise ConfigError(f"{cfg.path}: base_model is a Hugging Face directory, so --out "
                              "is already one; drop --hf-out")  # fmt: skip
        refuse_existing(Path(hf_out), overwrite)
    inputs = [cfg.path, cfg.base_model, *(e.source_model for e in cfg.experts + cfg.shared_experts)]
    with claim([out, hf_out], inputs):  # moe/io/output.py
        a = build_moe(cfg, seed)
        tok_dir = _tokenizer_dir(a.base)
        if a.base.kind == "hf":
            return write_hf(out, a.config, a.state, a.meta, cfg.path, tokenizer=tok_dir,
                            max_shard_size=max_shard_size)  # fmt: skip
        carried = carried_tokenizer(a.base.path, a.base.config.vocab_size)
        save_checkpoint(out, a.state, a.config, a.meta, overwrite=overwrite, tokenizer=carried)
        if hf_out is not None:
            write_hf(Path(hf_out), a.config, a.state, a.meta, out, tokenizer=tok_dir,
                     max_shard_size=max_shard_size)  # fmt: skip
        return out


__all__ = ["GATE_MODES", "assemble_from_config", "build_moe", "gate_rows", "layer_inputs",
           "lineage_distance", "load_moe_config"]
