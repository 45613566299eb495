"""mergekit's `slices:` syntax: layer stacking and per-range merges.

    merge_method: passthrough          # SOLAR depth up-scaling of one model
    slices:
      - sources: [{model: runs/base/model, layer_range: [0, 6]}]
      - sources: [{model: runs/base/model, layer_range: [2, 8]}]

The output's layers are the slices' layers in order. Within a slice every source names a range
of the same length, and output layer j of the slice is the method applied to layer a_k + j of
each source k (passthrough: one source; slerp: two, `t` from 0 = the first to 1 = the second;
methods with a base model: base_model must be one of the slice's sources, and is the base there,
the others the models). Tensors outside the layers (embedding, final norm, head) are merged the
same way across the first slice's sources (passthrough: the first source's). So a single slice
covering every layer of the models of a `models:` config gives exactly that config's merge.

Ranges may repeat or overlap across slices (that is what stacking is); a range must lie in its
model ([a, b) with 0 <= a < b <= n_layers) and a slice's ranges must have one length. Inputs are
moe-forge checkpoints (layers `layers.{i}.*`) or Hugging Face directories (`model.layers.{i}.*`),
all of one kind, with the same per-layer architecture; the output is of the inputs' kind, its
layer count (and a Hugging Face config's per-layer `layer_types`) that of the plan.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tqdm import tqdm

from moe.config import ConfigError
from moe.merge.config import _resolve
from moe.merge.gradients import position
from moe.merge.registry import MethodParams, MethodSpec

_LAYER = re.compile(r"^((?:model\.)?layers\.)(\d+)\.(.+)$")  # ours, or Hugging Face's


def _weight(c, s, name: str, p: float) -> float:
    return _resolve(s.parameters.weight, c.parameters.weight, name, p)


def _density(c, s, name: str, p: float) -> float:
    return _resolve(s.parameters.density, c.parameters.density, name, p)


def validate_slices(c, spec: MethodSpec, bad) -> None:
    """Checks of a `slices:` config that need no model (MergeConfig.validate calls it)."""
    from moe.delta.merge_source import input_problem

    if c.models:
        raise bad("give models: or slices:, not both")
    if c.expert is not None:
        raise bad("expert: selects an MoE expert to merge; it does not combine with slices:")
    for i, sl in enumerate(c.slices):
        where = f"slices[{i}]"
        if not sl.sources:
            raise bad(f"{where}.sources: list at least one source")
        n = len(sl.sources)
        if spec.exactly_one and n != 1:
            raise bad(f"{where}.sources: {c.merge_method} takes one source per slice, got {n}")
        if spec.exactly_two and n != 2:
            raise bad(f"{where}.sources: {c.merge_method} merges exactly two sources, got {n}")
        lengths = set()
        for k, s in enumerate(sl.sources):
            r = list(s.layer_range)
            if len(r) != 2 or not 0 <= r[0] < r[1]:
                raise bad(f"{where}.sources[{k}].layer_range: {r} is not [first, end) with "
                          "0 <= first < end")  # fmt: skip
            lengths.add(r[1] - r[0])  # densities, weights and t: MergeConfig's _check_forms
            problem = input_problem(s.model)
            if problem:
                raise bad(f"{where}.sources[{k}].model: {problem}")
        if len(lengths) > 1:
            raise bad(f"{where}: the sources' layer ranges differ in length ({sorted(lengths)}); "
                      "layer j of the slice merges layer first + j of every source")  # fmt: skip
        if spec.needs_base:
            if c.base_model is None:
                raise bad(f"base_model: {c.merge_method} needs a base model")
            if not any(_same(s.model, c.base_model) for s in sl.sources) or n < 2:
                raise bad(f"{where}: {c.merge_method} needs base_model among the slice's sources "
                          "and at least one other model")  # fmt: skip
    if spec.exactly_two and c.parameters.t is None:
        raise bad(f"parameters.t: {c.merge_method} needs t (0 = first source, 1 = second)")
    if c.base_model is not None:
        problem = input_problem(c.base_model)
        if problem:
            raise bad(f"base_model: {problem}")


def _same(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _plan(c, sources: dict) -> list[tuple[int, list[tuple[str, int]]]]:
    """[(slice index, [(model, layer), ...])] per output layer, ranges checked against models."""
    from moe.merge.merge import n_layers_of

    out = []
    for i, sl in enumerate(c.slices):
        for k, s in enumerate(sl.sources):
            n = n_layers_of(sources[s.model])
            if s.layer_range[1] > n:
                r = list(s.layer_range)
                raise ConfigError(f"merge config: slices[{i}].sources[{k}].layer_range {r} "
                                  f"exceeds {s.model}'s {n} layers")  # fmt: skip
        a0, b0 = sl.sources[0].layer_range
        for j in range(b0 - a0):
            out.append((i, [(s.model, s.layer_range[0] + j) for s in sl.sources]))
    return out


def _roles(c, spec: MethodSpec, sl, name: str, p: float
           ) -> tuple[int | None, list[int], list[float], list[float]]:  # fmt: skip
    """(index of the base among the slice's sources or None, the models' indices, weights,
    densities) for tensor `name` at gradient position `p`."""
    idx = list(range(len(sl.sources)))
    b = None
    if spec.needs_base:
        b = next(k for k in idx if _same(sl.sources[k].model, c.base_model))
        idx = [k for k in idx if k != b]
    elif spec.name == "slerp" and c.base_model is not None:  # mergekit: t = 0 is base_model
        idx.sort(key=lambda k: not _same(sl.sources[k].model, c.base_model))
    return (b, idx, [_weight(c, sl.sources[k], name, p) for k in idx],
            [_density(c, sl.sources[k], name, p) for k in idx])  # fmt: skip


def _check_tensors(srcs: list) -> None:
    """Same tensors outside the layers and the same per-layer tensors (names and shapes) in every
    source; the depths may differ."""
    def layout(src) -> tuple[dict, dict]:
        top, per_layer = {}, {}
        for n in src.names:
            m = _LAYER.match(n)
            if m is None:
                top[n] = tuple(src.shape(n))
            else:
                per_layer.setdefault(m.group(1) + m.group(3), tuple(src.shape(n)))
        return top, per_layer

    top0, layer0 = layout(srcs[0])
    for s in srcs[1:]:
        top, layer = layout(s)
        for what, a, b in (("tensor", top0, top), ("per-layer tensor", layer0, layer)):
            for n in sorted(set(a) | set(b)):
                if a.get(n) != b.get(n):
                    raise ConfigError(f"{what} {n} is {a.get(n) or 'absent'} in {srcs[0].path} "
                                      f"but {b.get(n) or 'absent'} in {s.path}")  # fmt: skip


def merge_slices(c, target: Path, overwrite: bool, progress: bool) -> Path:
    """Run a `slices:` merge (after `moe.merge.merge` checked the output path)."""
    from moe.config import model_config_from_dict
    from moe.data.tokenizer import check_same_tokenizer
    from moe.io.sources import open_source
    from moe.merge import registry
    from moe.merge.merge import (
        _ARCH_FIELDS,
        _HF_ARCH_FIELDS,
        _lineage_meta,
        check_lineage,
        hf_out_config,
        output_tokenizer,
        write_checkpoint,
        write_hf,
    )
    from moe.merge.mergekit import output_dtype, tokenizer_choice, tokenizer_key
    from moe.merge.vocab import map_inputs

    spec = registry.get(c.merge_method)
    names = list(dict.fromkeys(s.model for sl in c.slices for s in sl.sources))
    sources = {m: open_source(m) for m in names}
    for m in sources:
        if _same(m, target):
            raise ConfigError(f"output {target} is also an input of the merge")
    srcs = list(sources.values())
    for s in srcs[1:]:
        if s.kind != srcs[0].kind:
            raise ConfigError(f"slices: cannot stack a {srcs[0].kind} directory ({srcs[0].path}) "
                              f"with a {s.kind} one ({s.path}); import Hugging Face models "
                              "first (moe import) or export the checkpoints (moe export)")
    hf = srcs[0].kind == "hf"
    base_name = next((m for m in names if c.base_model and _same(m, c.base_model)), None)
    choice = tokenizer_choice(c)
    if choice is None:
        check_same_tokenizer([(s.path, int(s.config.get("vocab_size") or 0)) for s in srcs],
                             "merge")  # fmt: skip
    # tokenizer_source: every input's vocabulary rows mapped onto the output's (vocab.py)
    srcs, chosen, vocab_size = map_inputs(
        choice, tokenizer_key(c), sources[base_name] if base_name else None, srcs)
    sources = dict(zip(names, srcs))
    if hf:  # every per-layer field must agree; the depths may differ
        a0 = {k: srcs[0].config.get(k) for k in _HF_ARCH_FIELDS if k != "num_hidden_layers"}
        for s in srcs[1:]:
            for k, v0 in a0.items():
                if s.config.get(k) != v0:
                    raise ConfigError(f"architecture differs: config {k} is {v0!r} in "
                                      f"{srcs[0].path} but {s.config.get(k)!r} in {s.path}")
    else:
        cfg0 = model_config_from_dict(srcs[0].config).resolved()
        for s in srcs[1:]:
            cfg = model_config_from_dict(s.config).resolved()
            for k in [f for f in _ARCH_FIELDS if f != "n_layers"] + ["moe", "head_dim",
                                                                      "qkv_bias"]:  # fmt: skip
                v0, v = getattr(cfg0, k), getattr(cfg, k)
                if v != v0:
                    raise ConfigError(f"architecture differs: config {k} is {v0!r} in "
                                      f"{srcs[0].path} but {v!r} in {s.path}")  # fmt: skip
    _check_tensors(srcs)
    base_src = sources[base_name] if base_name is not None else None
    models = [s for m, s in sources.items() if s is not base_src]
    if not c.allow_cross_family:
        check_lineage(base_src, models or [base_src], None)
    plan = _plan(c, sources)
    p0 = dict(normalize=c.normalize(), scale=c.parameters.scale, seed=c.parameters.seed)
    out_name = output_dtype(c)
    out_dtype = getattr(torch, out_name) if out_name is not None else None

    def merged(sl, names_k: list[str], out_name: str, p: float) -> torch.Tensor:
        """The method over one tensor per source of slice `sl` (names_k[k] from source k);
        `out_name` at position `p` of the slice picks the parameters (gradients.py)."""
        b, idx, w, d = _roles(c, spec, sl, out_name, p)
        raw = [sources[sl.sources[k].model].read(names_k[k]) for k in range(len(names_k))]
        # computed in float32 (float64 inputs stay float64), as moe.merge.merge does
        ts = [t.double() if t.dtype == torch.float64 else t.float() for t in raw]
        base = ts[b] if b is not None else None
        # method-specific values: per-model ones from the merged sources' parameters
        extra = c.method_params(out_name, p, [sl.sources[k].parameters for k in idx])
        res = spec.fn(base, [ts[k] for k in idx], MethodParams(
            weights=w, densities=d, name=names_k[idx[0]], t=c.t(out_name, p), extra=extra,
            **p0))  # fmt: skip
        return res.to(out_dtype or raw[0].dtype)

    first = c.slices[0]
    template = sources[first.sources[0].model]
    tok, chat = output_tokenizer(c, template, chosen, srcs)
    layer_parts = sorted({(m.group(1), m.group(3)) for n in template.names
                          if (m := _LAYER.match(n))})  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    todo = [n for n in template.names if not _LAYER.match(n)]
    total = len(todo) + len(plan) * len(layer_parts)
    with tqdm(total=total, desc="merge slices", unit="tensor", disable=not progress) as bar:
        for n in todo:
            out[n] = merged(first, [n] * len(first.sources), n, position(n, 0, len(plan)))
            bar.update()
        for j, (i, src_layers) in enumerate(plan):
            # a gradient runs over the slice: j's place among the slice's output layers
            j0 = next(k for k, (i2, _) in enumerate(plan) if i2 == i)
            n_i = sum(1 for i2, _ in plan if i2 == i)
            for pre, suf in layer_parts:
                name = f"{pre}{j}.{suf}"
                src_names = [f"{pre}{layer}.{suf}" for _, layer in src_layers]
                out[name] = merged(c.slices[i], src_names, name, position(name, j0, n_i))
                bar.update()
    if hf:
        types = [sources[src_layers[0][0]].config.get("layer_types") for _, src_layers in plan]
        layer_types = None
        if all(isinstance(t, list) for t in types):
            layer_types = [t[layer] for t, (_, sl) in zip(types, plan) for layer in [sl[0][1]]]
        config = hf_out_config(template, out_name, tok, num_hidden_layers=len(plan),
                               layer_types=layer_types, vocab_size=vocab_size)  # fmt: skip
        write_hf(target, template, out, config, tok, chat)
        return target
    config = dict(template.config)
    config["n_layers"] = len(plan)
    meta = _lineage_meta(c, base_src, models or [base_src])  # its recipe: this config
    return write_checkpoint(target, out, config, meta, overwrite, tok, chat)
