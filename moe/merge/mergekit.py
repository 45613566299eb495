"""mergekit's top-level keys beyond the methods' parameters: what each does here, or why it is
refused. Every key mergekit's MergeConfiguration accepts is either honoured or refused in one
line naming it; none is silently ignored.

Honoured:
    dtype             the output's dtype when out_dtype is absent (the merge itself always
                      computes in float32, float64 for float64 inputs: never below mergekit's)
    out_dtype         the output's dtype (float32 | bfloat16 | float16)
    tokenizer_source  base | union | a model directory: the output's tokenizer; the inputs'
                      embedding and output-head rows are first mapped onto its vocabulary, token
                      by token (moe/merge/vocab.py). `union` only where every input has the same
                      vocabulary (then it is that vocabulary); over different vocabularies it is
                      refused, naming the limitation.
    tokenizer:        {source: ...}: the same as tokenizer_source
    chat_template     auto (the template most inputs carry) or the Jinja template's text
Refused (one line each): modules:, a slice's own base_model / parameters / residual_weight,
tokenizer.tokens / tokenizer.pad_to_multiple_of, chat_template naming one of mergekit's bundled
templates, model references with a LoRA (`model+lora`) or a Hub revision (`model@rev`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import ListConfig

from moe.config import ConfigError

OUT_DTYPES = ("float32", "bfloat16", "float16")

# mergekit keys read before the schema, so the message says why rather than "unknown key"
_REFUSED_TOP = {
    "modules": "per-module merges (multimodal models) are not supported; merge a causal LM's "
               "models: or slices:",
}  # fmt: skip
_REFUSED_SLICE = {
    "base_model": "a per-slice base model is not supported; set base_model: at the top level",
    "parameters": "per-slice parameters are not supported; give them per source "
                  "(sources[k].parameters) or globally (parameters:)",
    "residual_weight": "residual scaling of a slice is not supported",
}  # fmt: skip
_TOKENIZER_KEYS = {
    "source": None,
    "tokens": "per-token embedding sources are not supported; tokens missing from an input take "
              "the base model's row, else the mean of the inputs that have them",
    "pad_to_multiple_of": "padding the vocabulary is not supported",
}  # fmt: skip


def check_raw(raw: Any, where: str) -> None:
    """Refuse, naming the key and why, the mergekit keys this merge does not implement (the raw
    mapping, before the schema: otherwise they would read as unknown keys)."""
    if not hasattr(raw, "get"):
        return
    for key, why in _REFUSED_TOP.items():
        if raw.get(key) is not None:
            raise ConfigError(f"{where}: {key}: {why}")
    slices = raw.get("slices")
    for i, sl in enumerate(slices if isinstance(slices, (list, ListConfig)) else []):
        for key, why in _REFUSED_SLICE.items():
            if hasattr(sl, "get") and sl.get(key) is not None:
                raise ConfigError(f"{where}: slices[{i}].{key}: {why}")
    tok = raw.get("tokenizer")
    if tok is not None:
        if not hasattr(tok, "items"):
            raise ConfigError(f"{where}: tokenizer: must be a mapping ({{source: base | union | "
                              "a model directory}})")  # fmt: skip
        for key, v in tok.items():
            if key not in _TOKENIZER_KEYS:
                raise ConfigError(f"{where}: tokenizer.{key}: unknown key (mergekit's tokenizer: "
                                  "section takes source, tokens, pad_to_multiple_of)")
            why = _TOKENIZER_KEYS[key]
            if why is not None and v is not None:
                raise ConfigError(f"{where}: tokenizer.{key}: {why}")
        if not isinstance(tok.get("source"), str):
            raise ConfigError(f"{where}: tokenizer.source: give base, union or a model directory")
        if raw.get("tokenizer_source") is not None:
            raise ConfigError(f"{where}: tokenizer_source and tokenizer: name the tokenizer "
                              "twice; give one (as mergekit requires)")  # fmt: skip


def tokenizer_choice(c: Any) -> str | None:
    """`tokenizer_source`, or `tokenizer.source`; None: neither is given."""
    if c.tokenizer_source is not None:
        return c.tokenizer_source
    return c.tokenizer.get("source") if c.tokenizer else None


def tokenizer_key(c: Any) -> str:
    return "tokenizer_source" if c.tokenizer_source is not None else "tokenizer.source"


def output_dtype(c: Any) -> str | None:
    """The output's dtype: out_dtype, else dtype, else None (each tensor keeps its own)."""
    return c.out_dtype if c.out_dtype is not None else c.dtype


def _model_refs(c: Any) -> list[tuple[str, str]]:
    out = [("base_model", c.base_model)] if c.base_model is not None else []
    out += [(f"models[{i}].model", m.model) for i, m in enumerate(c.models)]
    out += [(f"slices[{i}].sources[{k}].model", s.model)
            for i, sl in enumerate(c.slices) for k, s in enumerate(sl.sources)]  # fmt: skip
    choice = tokenizer_choice(c)
    if choice not in (None, "base", "union"):
        out.append((tokenizer_key(c), choice))
    return out


def check(c: Any, bad: Callable[[str], Exception]) -> None:
    """Load-time checks of the keys above (MergeConfig's `validate` calls it)."""
    for key, v in (("dtype", c.dtype), ("out_dtype", c.out_dtype)):
        if v is not None and v not in OUT_DTYPES:
            raise bad(f"{key}: {v!r} is not one of {', '.join(OUT_DTYPES)}")
    for key, ref in _model_refs(c):
        if Path(ref).exists():
            continue
        if "+" in ref:
            raise bad(f"{key}: {ref!r} names a LoRA adapter (mergekit's model+lora); merge the "
                      "adapter into its model first: full weights only are merged")
        if "@" in ref:
            raise bad(f"{key}: {ref!r} pins a Hugging Face Hub revision; models are read from "
                      "local directories only (download that revision first)")
    choice = tokenizer_choice(c)
    if choice not in (None, "base", "union"):
        from moe.data.tokenizer import carried_tokenizer
        from moe.io.sources import resolve_input

        p = resolve_input(choice)
        if not p.is_dir() or not isinstance(carried_tokenizer(p, 0), Path):
            raise bad(f"{tokenizer_key(c)}: {choice} holds no tokenizer files (tokenizer.json or "
                      "tokenizer.model); give base, union or a model directory with a tokenizer")
    t = c.chat_template
    if t is not None and t != "auto" and not is_jinja(t):
        raise bad(f"chat_template: {t!r} names one of mergekit's bundled templates, which are "
                  "not shipped here; give auto or the template's Jinja text")


def is_jinja(text: str) -> bool:
    return "{{" in text or "{%" in text
