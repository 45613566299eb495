"""`moe merge`: merge checkpoints tensor by tensor with a registered method.

Flow: open every input without loading it (`sources.open_source`), check lineage (same base model,
same expert family), architecture and every tensor's name and shape, then for each tensor read it
from each input, merge it, and keep only the merged result. Peak memory is therefore about one
model (the output being assembled) plus one tensor per input, whatever the number of inputs.

Expert selection (`expert: code`) on MoE checkpoints merges only slice e of the expert tensors
`layers.{i}.ffn.{w1,w3,w2}` (expert on dim 0, e = the expert's index in config.json's
moe.experts); every other slice and tensor is copied from base_model (or the first model) unchanged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from moe.config import ConfigError, model_config_from_dict, to_dict
from moe.data.tokenizer import carried_tokenizer, check_same_tokenizer
from moe.io.checkpoint import CheckpointError, make_meta, new_id, replace_dir, save_checkpoint
from moe.io.output import claim
from moe.io.sources import HF_INDEX, Source, open_source, page_tensor, resolve_input
from moe.merge import registry
from moe.merge.config import MergeConfig, load_merge_config, validate
from moe.merge.gradients import position
from moe.merge.mergekit import output_dtype, tokenizer_choice, tokenizer_key
from moe.merge.registry import MethodParams
from moe.merge.vocab import map_inputs

_EXPERT_TENSOR = re.compile(r"layers\.\d+\.ffn\.(w1|w3|w2)$")

# Architecture fields that must agree between inputs (shapes alone miss e.g. head count)
_ARCH_FIELDS = (
    "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "rope_theta",
    "norm_eps", "tie_embeddings",
)  # fmt: skip
_MOE_ARCH_FIELDS = (
    "experts", "expert_ffn_dim", "router", "top_k", "shared_expert_ffn_dim", "normalize_weights",
    "scoring",
)  # fmt: skip
_HF_ARCH_FIELDS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "intermediate_size", "vocab_size", "head_dim", "rope_theta",
    "rope_scaling", "rope_parameters", "rms_norm_eps", "tie_word_embeddings", "hidden_act",
)  # fmt: skip
_FAMILY_HINT = "(set allow_cross_family: true to merge anyway)"


def _arch(src: Source) -> dict[str, Any]:
    if src.kind == "hf":
        return {k: src.config.get(k) for k in _HF_ARCH_FIELDS}
    cfg = model_config_from_dict(src.config).resolved()
    out = {k: getattr(cfg, k) for k in _ARCH_FIELDS}
    out.update({f"moe.{k}": getattr(cfg.moe, k) for k in _MOE_ARCH_FIELDS})
    return out


def n_layers_of(src: Source) -> int:
    """The number of layers of a merge input (a config may leave it to its `size`)."""
    if src.kind == "hf":
        return int(src.config["num_hidden_layers"])
    return model_config_from_dict(src.config).resolved().n_layers


def check_compatible(sources: list[Source]) -> None:
    """Same kind, same architecture, same tensor names and shapes; messages name what differs."""
    first = sources[0]
    for s in sources[1:]:
        if s.kind != first.kind:
            raise ConfigError(
                f"cannot merge a {first.kind} directory ({first.path}) with a {s.kind} one "
                f"({s.path}); import Hugging Face models first (moe import)"
            )
    a0 = _arch(first)
    for s in sources[1:]:
        a = _arch(s)
        for k, v in a0.items():
            if a[k] != v:
                raise ConfigError(
                    f"architecture differs: config {k} is {v!r} in {first.path} but {a[k]!r} "
                    f"in {s.path}"
                )
    units0 = _pruned_units(first)
    for s in sources[1:]:
        if _pruned_units(s) != units0:
            # same shapes, but the tensors' rows are different neurons/heads of the original
            raise ConfigError(
                f"{first.path} and {s.path} keep different units of their model (meta.json "
                f"prune.plan.units_sha256 {_short(units0)} vs {_short(_pruned_units(s))}): "
                "their tensors' rows are different heads and neurons, so they cannot be merged"
            )
    names0 = set(first.names)
    for s in sources[1:]:
        names = set(s.names)
        if names != names0:
            extra = sorted(names - names0)
            if extra:
                raise ConfigError(f"tensor {extra[0]} is in {s.path} but not in {first.path}")
            raise ConfigError(
                f"tensor {sorted(names0 - names)[0]} is in {first.path} but not in {s.path}"
            )
        for n in first.names:
            if s.shape(n) != first.shape(n):
                raise ConfigError(
                    f"tensor {n} has shape {tuple(first.shape(n))} in {first.path} but "
                    f"{tuple(s.shape(n))} in {s.path}"
                )


def _pruned_units(src: Source) -> str | None:
    """The digest of the units a `moe prune` kept (None: not a prune)."""
    return (((src.meta or {}).get("prune") or {}).get("plan") or {}).get("units_sha256")


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "none (not pruned)"


def check_lineage(base: Source | None, models: list[Source], expert: str | None) -> None:
    """Merged models must share a base model and an expert family (moe checkpoints only)."""
    inputs = ([base] if base is not None else []) + models
    if any(s.meta is None or _bare_import(s.meta) for s in inputs):
        # Hugging Face directories, and models imported from them as is, carry no lineage (an
        # import is its own base): names, shapes and config decide
        return
    b0 = inputs[0].meta.get("base_id")
    for s in inputs[1:]:
        if s.meta.get("base_id") != b0:
            raise ConfigError(
                f"lineage differs: {inputs[0].path} descends from base {b0!r} but {s.path} from "
                f"{s.meta.get('base_id')!r} {_FAMILY_HINT}"
            )
    fam0 = models[0].meta.get("family")
    for s in models[1:]:
        if s.meta.get("family") != fam0:
            raise ConfigError(
                f"models come from different expert families: {models[0].path} is {fam0!r}, "
                f"{s.path} is {s.meta.get('family')!r} {_FAMILY_HINT}"
            )
    if base is not None and base.meta.get("family") not in (None, fam0):
        raise ConfigError(
            f"base_model {base.path} is of expert family {base.meta.get('family')!r} but the "
            f"models are {fam0!r} {_FAMILY_HINT}"
        )
    if expert is not None and fam0 not in (None, expert):
        raise ConfigError(
            f"expert: {expert!r} but the models are fine-tunes of expert family {fam0!r} "
            f"{_FAMILY_HINT}"
        )


def _bare_import(meta: dict[str, Any]) -> bool:
    """A checkpoint imported from Hugging Face (or GGUF) and not trained since."""
    return bool(meta.get("hf_source")) and not meta.get("parents")


def _expert_index(src: Source, expert: str | None) -> int | None:
    """Index of the selected expert in an MoE checkpoint; None = merge every tensor whole."""
    if expert is None:
        return None
    if src.kind == "hf":
        raise ConfigError(
            f"expert: {expert!r} selects an expert of a moe-forge MoE checkpoint; {src.path} "
            "is a Hugging Face directory"
        )
    experts = list((src.config.get("moe") or {}).get("experts") or [])
    if not experts:
        return None  # a dense branch of that family: the whole model is the expert
    if expert not in experts:
        raise ConfigError(
            f"expert: {expert!r} is not an expert of {src.path} (experts: {', '.join(experts)})"
        )
    return experts.index(expert)


def _lineage_meta(cfg: MergeConfig, base: Source | None, models: list[Source]) -> dict[str, Any]:
    metas = [m.meta or {} for m in models]
    bmeta = (base.meta or {}) if base is not None else None
    fams = {m.get("family") for m in metas}
    doms = {m.get("domain") for m in metas}

    def total(key: str) -> float:
        # each fine-tune's count includes its base's; count the shared part once
        s = sum(float(m.get(key) or 0) for m in metas)
        if bmeta is not None:
            s -= (len(metas) - 1) * float(bmeta.get(key) or 0)
        return s

    parents = ([bmeta["id"]] if bmeta and bmeta.get("id") else []) + [
        m["id"] for m in metas if m.get("id")
    ]
    recipe = to_dict(cfg)
    recipe["parameters"]["lambda"] = recipe["parameters"].pop("scale")
    # the training recipe of the inputs: `moe eval` rebuilds the same held-out data from it
    train_recipe = next(
        (
            m.get("recipe") if "data" in (m.get("recipe") or {}) else m.get("train_recipe")
            for m in ([bmeta] if bmeta else []) + metas
            if "data" in (m.get("recipe") or {}) or m.get("train_recipe")
        ),
        None,
    )
    shared = {int(m.get("shared_ffn_dim", 0)) for m in metas}
    return make_meta(
        parents=parents,
        base_id=(bmeta or metas[0]).get("base_id"),
        family=fams.pop() if len(fams) == 1 else None,
        domain=doms.pop() if len(doms) == 1 else None,
        kind="merge",
        tokens_seen=int(total("tokens_seen")),
        train_flops=total("train_flops"),
        recipe=recipe,
        train_recipe=train_recipe,
        shared_ffn_dim=shared.pop() if len(shared) == 1 else 0,
    )


def hf_out_config(template: Source, dtype: str | None, tok: Any, **updates: Any
                  ) -> dict[str, Any]:  # fmt: skip
    """config.json of a merged Hugging Face directory: the template's, with `updates` (layer
    count, vocab_size), the output dtype, and the special token ids of the model whose tokenizer
    the output carries."""
    cfg = dict(template.config)
    cfg.update({k: v for k, v in updates.items() if v is not None})
    if dtype is not None:  # transformers 4 reads torch_dtype, 5 writes dtype
        for key in [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]:
            cfg[key] = dtype
    if isinstance(tok, Path) and tok.resolve() != template.path.resolve():
        other = tok / "config.json"
        if other.is_file():
            ids = json.loads(other.read_text(encoding="utf-8"))
            cfg.update({k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                        if k in ids})  # fmt: skip
    return cfg


def write_hf(out: Path, template: Source, tensors: dict[str, torch.Tensor],
             config: dict[str, Any], tok: Any, chat: str | None) -> None:  # fmt: skip
    """HF output, staged and renamed: the weights (sharded above 5GB, as transformers does),
    `config`, the template's other non-weight files and the tokenizer `tok` (a directory of
    files; anything else: none), with `chat` as its chat template."""
    from moe.data.tokenizer import TOKENIZER_FILES
    from moe.io.hf_files import DEFAULT_MAX_SHARD_SIZE, save_weights
    from moe.merge.vocab import write_tokenizer_files

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{new_id()}")
    tmp.mkdir()
    try:
        save_weights(tensors, tmp, DEFAULT_MAX_SHARD_SIZE)
        for f in template.path.iterdir():
            if (f.is_file() and not f.name.endswith(".safetensors") and f.name != HF_INDEX
                    and f.name not in TOKENIZER_FILES):  # fmt: skip
                shutil.copy2(f, tmp / f.name)
        gen = tok / "generation_config.json" if isinstance(tok, Path) else None
        if gen is not None and gen.is_file():  # the token ids of the tokenizer's own model
            shutil.copy2(gen, tmp / gen.name)
        if isinstance(tok, Path):
            write_tokenizer_files(tmp, tok, chat)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def output_tokenizer(cfg: MergeConfig, template: Source, chosen: Any, inputs: list[Source]
                     ) -> tuple[Any, str | None]:  # fmt: skip
    """(the tokenizer the output carries, its chat template or None), checked before any
    weight is read: `chosen` (tokenizer_source's) or the template's own."""
    from moe.merge.vocab import chat_template

    tok = chosen if chosen is not None else carried_tokenizer(
        template.path, int(template.config.get("vocab_size") or 0))
    chat = chat_template(cfg.chat_template, inputs)
    if chat is not None and not isinstance(tok, Path):
        what = "no tokenizer" if tok is None else "moe-forge's byte tokenizer"
        raise ConfigError(f"chat_template: the output carries {what}, which has no "
                          "tokenizer_config.json to hold a chat template")
    return tok, chat


def write_checkpoint(target: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                     meta: dict[str, Any], overwrite: bool, tok: Any, chat: str | None
                     ) -> Path:  # fmt: skip
    """moe-forge output: `save_checkpoint`, the tokenizer given its chat template first."""
    if chat is None:
        return save_checkpoint(target, tensors, config, meta, overwrite=overwrite, tokenizer=tok)
    import tempfile

    from moe.merge.vocab import write_tokenizer_files

    with tempfile.TemporaryDirectory(prefix="moe-merge-tokenizer-") as d:
        write_tokenizer_files(Path(d), tok, chat)
        return save_checkpoint(target, tensors, config, meta, overwrite=overwrite,
                               tokenizer=Path(d))


def _malloc_trim() -> Callable[[], object]:
    """glibc's malloc_trim(0), or a no-op elsewhere.

    Each tensor's temporaries are freed into the malloc heap, where small long-lived objects
    allocated in between pin them; without a trim per tensor, heap fragmentation alone grew to
    ~0.7x the model over a 100M-parameter merge (measured with tools/bench_merge.py).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


def _operand(
    src: Source, template: Source, t0: torch.Tensor, name: str, e: int | None, dtype: torch.dtype
) -> torch.Tensor:
    """Tensor `name` of `src` (slice e of dim 0 when given) in the compute dtype."""
    t = t0 if src is template else src.read(name)
    return (t[e] if e is not None else t).to(dtype)


def merge(
    config: MergeConfig | str | os.PathLike,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Merge the checkpoints a MergeConfig (or MERGE.yaml path) names; returns the output path.

    The output is a moe-forge checkpoint (lineage: parents = input ids, kind "merge", recipe =
    this config) when the inputs are, and a Hugging Face directory when the inputs are HF dirs.
    """
    if isinstance(config, MergeConfig):
        cfg = config
        validate(cfg)
    else:
        cfg = load_merge_config(config)
    target = out if out is not None else cfg.out
    if target is None:
        raise ConfigError("merge: no output directory (pass out, --out, or set out: in the config)")
    target = Path(target)
    if target.exists() and not overwrite:
        raise CheckpointError(f"output {target} already exists (pass --overwrite to replace it)")
    inputs = [cfg.base_model, *(m.model for m in cfg.models),
              *(s.model for sl in cfg.slices for s in sl.sources)]  # fmt: skip
    if not isinstance(config, MergeConfig):
        inputs.append(config)  # the config file itself
    with claim(target, inputs):  # moe/io/output.py: before any input is opened
        return _merge(cfg, target, overwrite, progress)


def _merge(cfg: MergeConfig, target: Path, overwrite: bool, progress: bool) -> Path:
    """`merge` once its output is claimed."""
    spec = registry.get(cfg.merge_method)
    if cfg.slices:  # mergekit layer stacking / per-range merges
        from moe.merge.slices import merge_slices

        return merge_slices(cfg, target, overwrite, progress)

    base = open_source(cfg.base_model) if cfg.base_model is not None else None
    from moe.delta.merge_source import open_model  # a models: entry may be a delta file

    models = [open_model(m.model, base) for m in cfg.models]
    inputs = ([base] if base is not None else []) + models
    choice = tokenizer_choice(cfg)
    if choice is None:
        # one tokenizer: inputs whose tokenizers differ cannot be merged, whatever their shapes
        check_same_tokenizer([(getattr(s, "tokenizer_dir", s.path),
                               int(s.config.get("vocab_size") or 0)) for s in inputs],
                             "merge")  # fmt: skip
    # tokenizer_source: every input's vocabulary rows mapped onto the output's (vocab.py)
    inputs, chosen, vocab_size = map_inputs(choice, tokenizer_key(cfg), base, inputs)
    base, models = (inputs[0], inputs[1:]) if base is not None else (None, inputs)
    check_compatible(inputs)
    if not cfg.allow_cross_family:
        check_lineage(base, models, cfg.expert)
    template = inputs[0]
    e = _expert_index(template, cfg.expert)
    tok, chat = output_tokenizer(cfg, template, chosen, inputs)
    order = list(range(len(models)))
    if spec.name == "slerp" and cfg.base_model is not None:  # mergekit: t = 0 is base_model
        base_path = resolve_input(cfg.base_model).resolve()
        order.sort(key=lambda i: models[i].path.resolve() != base_path)

    n = len(models)
    n_layers = n_layers_of(template)

    def params(name: str) -> dict:
        """Per tensor: weight, density and t may be gradients or filtered (gradients.py)."""
        p = position(name, 0, n_layers)
        return dict(weights=[cfg.weight(i, name, p) for i in range(n)],
                    densities=[cfg.density(i, name, p) for i in range(n)],
                    normalize=cfg.normalize(), scale=cfg.parameters.scale, t=cfg.t(name, p),
                    seed=cfg.parameters.seed, extra=cfg.method_params(name, p))  # fmt: skip
    out_name = output_dtype(cfg)
    out_dtype = getattr(torch, out_name) if out_name is not None else None
    merged: dict[str, torch.Tensor] = {}
    release = _malloc_trim()
    for name in tqdm(template.names, desc="merge", unit="tensor", disable=not progress):
        t0 = template.read(name)
        dtype = out_dtype or t0.dtype
        if not t0.is_floating_point():
            merged[name] = t0  # integer buffers (none in our models) are copied, never averaged
            continue
        expert_slice = e is not None and bool(_EXPERT_TENSOR.search(name))
        if e is not None and not expert_slice:
            merged[name] = t0 if dtype == t0.dtype else page_tensor(t0.shape, dtype).copy_(t0)
            continue
        # compute in float32, or float64 when the inputs are float64
        cdt = torch.float64 if t0.dtype == torch.float64 else torch.float32
        sl = e if expert_slice else None
        b = _operand(base, template, t0, name, sl, cdt) if base is not None else None
        ts = [_operand(models[i], template, t0, name, sl, cdt) for i in order]
        res = spec.fn(b, ts, MethodParams(name=name, **params(name)))
        if not bool(torch.isfinite(res).all()):  # finite inputs, weights too large for them
            raise ConfigError(f"merge: {name} comes out with inf or NaN values; the weights "
                              "(weight, lambda, scale) are too large for these models")
        # the kept output lives in its own mapping (see sources.page_tensor)
        out_t = page_tensor(t0.shape, dtype)
        if expert_slice:
            out_t.copy_(t0)
            out_t[e] = res
        else:
            out_t.copy_(res)
        merged[name] = out_t
        del b, ts, res, t0
        release()

    if template.kind == "hf":
        config = hf_out_config(template, out_name, tok, vocab_size=vocab_size)
        write_hf(target, template, merged, config, tok, chat)
        return target
    return write_checkpoint(target, merged, template.config, _lineage_meta(cfg, base, models),
                            overwrite, tok, chat)
