"""The output's tokenizer (mergekit's `tokenizer_source`) and the inputs' vocabulary rows mapped
onto it, token by token.

The output carries tokenizer T: the base model's (`base`; the first input without a base model),
a model directory's (a path), or, for `union`, the one vocabulary every input shares. Its
vocabulary has N rows: the vocab_size of the input whose tokenizer directory T is, else T's own
size (largest id + 1). For input k with vocabulary V_k (token -> id, ids below its vocab_size),
row r of the output's embedding (and untied output head) is

    E'_k[r] = E_k[V_k[tok(r)]]       when input k has the token tok(r) that T gives id r
    E'_k[r] = D[r]                   otherwise, with
    D[r]    = E'_base[r]             when the base model has the token,
            = mean of E'_j[r] over the inputs j that have it, or 0 when none has it

(a row without a token in T, a padding row, is "had" by the inputs whose tokenizer is T itself).
The merge method then runs on the E'_k as on any other tensor. An input whose vocabulary equals T's
in tokens, ids and size is read unchanged (no copy), so the common case costs nothing.
`union` over different vocabularies is refused: it needs a new tokenizer file that adds the
missing tokens, which this merge does not build.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from moe.config import ConfigError
from moe.data.tokenizer import (
    BYTE_HASH,
    ByteTokenizer,
    _load_backend,
    carried_tokenizer,
    files_hash,
    tokenizer_files,
)
from moe.io.sources import Source, resolve_input

# the tensors indexed by token id: embedding and output head (ours, Hugging Face's)
VOCAB_TENSORS = frozenset({"tok_emb.weight", "lm_head.weight", "model.embed_tokens.weight"})


class Vocab:
    """One tokenizer, as the merge sees it: a content hash and token -> id (None: byte)."""

    def __init__(self, where: Path, vocab_size: int, key: str) -> None:
        carried = carried_tokenizer(where, vocab_size)
        if carried is None:
            raise ConfigError(f"{key}: {where} carries no tokenizer, so its embedding rows "
                              "cannot be matched to the output's tokens")  # fmt: skip
        self.dir = carried if isinstance(carried, Path) else None
        if self.dir is None:  # moe-forge's byte tokenizer: id = byte, specials 256-258
            self.hash, self.ids = BYTE_HASH, None
            self.size = ByteTokenizer.vocab_size
            return
        files = tokenizer_files(self.dir)
        self.hash = files_hash(files)
        ids = _load_backend(self.dir, files).get_vocab(with_added_tokens=True)
        limit = vocab_size if vocab_size > 0 else None
        self.ids = {t: int(i) for t, i in ids.items() if limit is None or i < limit}
        self.size = max(self.ids.values(), default=-1) + 1


def output_tokenizer(choice: str, key: str, base: Source | None, inputs: list[Source]
                     ) -> tuple[Vocab, int, Source | None]:  # fmt: skip
    """(T, N, the input T belongs to or None) for `tokenizer_source` value `choice`."""
    vocabs = [Vocab(_tok_dir(s), _vocab_size(s), key) for s in inputs]
    if choice in ("base", "union"):
        owner = base if base is not None else inputs[0]
        target = vocabs[inputs.index(owner)]
        if choice == "union":
            differ = next((s for s, v in zip(inputs, vocabs)
                           if v.ids != target.ids or _vocab_size(s) != _vocab_size(owner)),
                          None)  # fmt: skip
            if differ is not None:
                raise ConfigError(
                    f"{key}: union: {differ.path} and {owner.path} have different vocabularies, "
                    "and building a union tokenizer is not supported; use base or a model "
                    "directory (tokens a model lacks then take the base's or the mean row)")
        return target, _vocab_size(owner), owner
    p = resolve_input(choice)
    owner = next((s for s in inputs if s.path.resolve() == p.resolve()), None)
    if owner is not None:
        return vocabs[inputs.index(owner)], _vocab_size(owner), owner
    size = 0
    if (p / "config.json").is_file():
        size = int(json.loads((p / "config.json").read_text()).get("vocab_size") or 0)
    target = Vocab(p, size, key)
    return target, size or target.size, None


def _tok_dir(s: Source) -> Path:
    return Path(getattr(s, "tokenizer_dir", s.path))  # a delta file: its base's tokenizer


def _vocab_size(s: Source) -> int:
    return int(s.config.get("vocab_size") or 0)


def row_map(target: Vocab, n: int, v: Vocab, n_in: int, key: str, where: Path
            ) -> torch.Tensor | None:  # fmt: skip
    """(n,) source row of each output row (-1: the input lacks that token); None: identity."""
    same = v.hash == target.hash
    if n_in == n and (same or (v.ids is not None and v.ids == target.ids)):
        return None  # same tokens and ids (the files may differ elsewhere, e.g. a chat template)
    if target.ids is None or v.ids is None:
        if not same:
            raise ConfigError(f"{key}: {where} and the output tokenizer are not both Hugging "
                              "Face tokenizers; moe-forge's byte tokenizer cannot be matched "
                              "token by token to another")  # fmt: skip
        m = torch.arange(n)
        m[m >= n_in] = -1
        return m
    m = torch.full((n,), -1, dtype=torch.long)
    for tok, r in target.ids.items():
        if r < n and (i := v.ids.get(tok)) is not None:
            m[r] = i
    if same:  # padding rows (no token): the input's own rows, where it has them
        pad = torch.ones(n, dtype=torch.bool)
        pad[[r for r in target.ids.values() if r < n]] = False
        pad[n_in:] = False
        m[pad] = torch.arange(n)[pad]
    return m


class Remap:
    """The mapped vocabulary rows of every input, one tensor name at a time (see the module doc).
    Holds one name's rows at once: about one embedding per input, the merge's own working set."""

    def __init__(self, sources: list[Source], maps: list[torch.Tensor | None], n: int,
                 base: int | None) -> None:  # fmt: skip
        self.sources, self.maps, self.n, self.base = sources, maps, n, base
        self._name: str | None = None
        self._rows: list[torch.Tensor] = []

    def rows(self, name: str, k: int) -> torch.Tensor:
        if name != self._name:
            self._rows, self._name = [], None
            self._rows = self._compute(name)
            self._name = name
        return self._rows[k]

    def _compute(self, name: str) -> list[torch.Tensor]:
        raws = [s.read(name) for s in self.sources]
        got, have = [], []
        for t, m in zip(raws, self.maps):
            if m is None:
                got.append(t.float() if t.dtype != torch.float64 else t)
                have.append(torch.ones(self.n, dtype=torch.bool))
                continue
            g = t[m.clamp(min=0)].to(torch.float64 if t.dtype == torch.float64 else torch.float32)
            g[m < 0] = 0
            got.append(g)
            have.append(m >= 0)
        count = torch.stack(have).sum(0)
        default = torch.stack(got).sum(0) / count.clamp(min=1).unsqueeze(1).to(got[0].dtype)
        if self.base is not None:  # the base model's row, where it has the token
            default = torch.where(have[self.base].unsqueeze(1), got[self.base], default)
        out = []
        for t, m, g, h in zip(raws, self.maps, got, have):
            out.append(t if m is None else torch.where(h.unsqueeze(1), g, default).to(t.dtype))
        return out


class Remapped(Source):
    """Input k with its vocabulary rows mapped onto the output's tokenizer (shape (N, dim))."""

    def __init__(self, inner: Source, remap: Remap, k: int) -> None:
        config = dict(inner.config)
        config["vocab_size"] = remap.n
        super().__init__(inner.path, inner.kind, config, inner.meta, inner.files)
        self.inner, self.remap, self.k = inner, remap, k

    def shape(self, name: str) -> tuple[int, ...]:
        s = self.inner.shape(name)
        return (self.remap.n, *s[1:]) if name in VOCAB_TENSORS else s

    def read(self, name: str) -> torch.Tensor:
        if name in VOCAB_TENSORS:
            return self.remap.rows(name, self.k)
        return self.inner.read(name)


def map_inputs(choice: str | None, key: str, base: Source | None, inputs: list[Source]
               ) -> tuple[list[Source], Path | ByteTokenizer | None, int | None]:  # fmt: skip
    """The inputs as the merge reads them, the output's tokenizer (a directory of files, the byte
    tokenizer, or None: leave it to the caller) and the output's vocab_size (None: unchanged).
    `base` is one of `inputs` (or None); without a `choice` nothing changes."""
    if choice is None:
        return inputs, None, None
    target, n, owner = output_tokenizer(choice, key, base, inputs)
    maps = [row_map(target, n, Vocab(_tok_dir(s), _vocab_size(s), key), _vocab_size(s), key,
                    s.path) for s in inputs]  # fmt: skip
    tok = target.dir if target.dir is not None else ByteTokenizer()
    if all(m is None for m in maps):
        return inputs, tok, None
    remap = Remap(inputs, maps, n, inputs.index(base) if base is not None else None)
    return [Remapped(s, remap, k) for k, s in enumerate(inputs)], tok, n


# ----------------------------------------------------------------------------- chat template


def _chat_template(d: Path) -> str | None:
    """A tokenizer directory's chat template: chat_template.jinja, else tokenizer_config.json's."""
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    cfg = _json(d / "tokenizer_config.json")
    t = cfg.get("chat_template")
    return t if isinstance(t, str) else None


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return obj if isinstance(obj, dict) else {}


def chat_template(value: str | None, inputs: list[Source]) -> str | None:
    """The template to write: the Jinja text given, or for `auto` the one most inputs carry
    (the first input's among equals; None when no input has one)."""
    if value is None or value != "auto":
        return value
    found = []
    for s in inputs:
        d = carried_tokenizer(_tok_dir(s), _vocab_size(s))
        if isinstance(d, Path) and (t := _chat_template(d)) is not None:
            found.append(t)
    return Counter(found).most_common(1)[0][0] if found else None


def write_tokenizer_files(dest: Path, tok: Path, template: str | None) -> None:
    """Copy tokenizer directory `tok`'s files into `dest`, with `template` as its chat template
    (in tokenizer_config.json, and chat_template.jinja where the tokenizer keeps one)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, f in tokenizer_files(tok).items():
        (dest / name).write_bytes(f.read_bytes())
    if template is None:
        return
    cfg = _json(dest / "tokenizer_config.json")
    cfg["chat_template"] = template
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if (dest / "chat_template.jinja").is_file():
        (dest / "chat_template.jinja").write_text(template, encoding="utf-8")
