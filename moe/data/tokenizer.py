"""Tokenizers: the shared byte-level tokenizer (default) and any Hugging Face tokenizer.

`load_tokenizer(spec)`: `byte` (or None) is `ByteTokenizer`; a directory holding `tokenizer.json`
(or only a sentencepiece `tokenizer.model`, converted through transformers) or a `tokenizer.json`
file is an `HFTokenizer`. Both have the same interface: name, vocab_size, bos_id, eos_id, pad_id,
encode(text) -> ids, decode(ids) -> bytes, byte_lengths, and `identity()` (what a checkpoint's
meta.json records: the kind and a content hash, so checkpoints with different tokenizers are
never mixed).

Bits per byte divide by the UTF-8 bytes of the text each target token covers, so a byte model and
a BPE model on the same text share a denominator. For the byte tokenizer a token is one byte
(`byte_lengths`, 0 for specials). An HF tokenizer measures it per token while packing
(`encode_with_bytes`): from the character offsets the tokenizer reports, token i covers the bytes
from the end of the text covered so far to the end of its own span. Pieces no token spans
(whitespace a pre-tokenizer dropped) go to the next token, what is left at a document's end to its
EOS, and a character split over several byte-level tokens to the first of them; so a
document's counts always sum to its byte length. BOS/EOS/PAD cover 0 bytes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from moe.config import ConfigError

IGNORE_INDEX = -100  # target id that contributes no loss (same value as moe.model.transformer)
TOKENIZER_DIR = "tokenizer"  # where a checkpoint keeps its tokenizer's files
# The files of a Hugging Face tokenizer: what a checkpoint carries and what its hash covers
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "vocab.json", "merges.txt", "added_tokens.json",
)  # fmt: skip
BYTE_HASH = "byte"  # the byte tokenizer's "content hash": it has no files
# Names of document separators, tried in order when no tokenizer_config.json names them
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "[BOS]", "<|startoftext|>", "<|endoftext|>")
EOS_NAMES = ("</s>", "<|end_of_text|>", "<eos>", "[EOS]", "<|endoftext|>", "<|im_end|>")
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    byte_lengths: np.ndarray

    def encode(self, data: bytes | str) -> list[int]: ...

    def decode(self, ids) -> bytes: ...


class ByteTokenizer:
    """One token per byte (ids 0..255), then BOS=256, EOS=257, PAD=258.

    Any byte string round-trips, invalid UTF-8 included: the tokenizer never decodes text.
    DNA is one token per base because a base is one ASCII byte.
    """

    name = "byte"
    kind = "byte"
    unk_id = None
    BOS = 256
    EOS = 257
    PAD = 258
    vocab_size = 259
    bos_id, eos_id, pad_id = BOS, EOS, PAD
    has_bos = True  # a BOS of its own (HFTokenizer: False when BOS stands in for a missing one)

    def __init__(self) -> None:
        self.byte_lengths = np.zeros(self.vocab_size, dtype=np.int64)
        self.byte_lengths[:256] = 1

    def encode(self, data: bytes | str) -> list[int]:
        if isinstance(data, str):
            data = data.encode("utf-8")
        return list(data)

    def encode_np(self, data: bytes) -> np.ndarray:
        """Fast path for corpus building: the bytes themselves are the ids."""
        return np.frombuffer(data, dtype=np.uint8)

    def decode(self, ids) -> bytes:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes(i for i in ids if 0 <= i < 256)

    def identity(self) -> dict:
        return {"kind": "byte", "sha256": BYTE_HASH, "vocab_size": self.vocab_size}


def tokenizer_files(path: str | Path) -> dict[str, Path]:
    """The Hugging Face tokenizer files at `path` (a directory, or one tokenizer.json file)."""
    p = Path(path)
    if p.is_file():
        return {"tokenizer.json": p}
    if not p.is_dir():
        return {}
    return {f: p / f for f in TOKENIZER_FILES if (p / f).is_file()}


def files_hash(files: dict[str, Path]) -> str:
    """Content hash of a tokenizer: sha256 over its files' names and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name].read_bytes()).digest())
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load_backend(path: Path, files: dict[str, Path]):
    """A `tokenizers.Tokenizer`: tokenizer.json directly, a sentencepiece-only directory through
    transformers' conversion."""
    if "tokenizer.json" in files:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError(
                f"tokenizer {str(path)!r} needs the tokenizers package (pip install tokenizers)"
            ) from None
        try:
            return Tokenizer.from_file(str(files["tokenizer.json"]))
        except Exception as e:  # the Rust side raises plain Exceptions
            raise ConfigError(f"cannot load tokenizer {str(path)!r}: {_first_line(e)}") from None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(
            f"tokenizer {str(path)!r} has no tokenizer.json; converting its tokenizer.model needs "
            "the transformers package (pip install 'moe-forge[hf]')"
        ) from None
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
        return tok.backend_tokenizer
    except Exception as e:  # transformers raises many types (OSError, ValueError, ...)
        raise ConfigError(f"cannot load tokenizer {str(path)!r}: {_first_line(e)}") from None


def _configured_specials(path: Path) -> dict[str, str]:
    """bos/eos/pad/unk token strings named by tokenizer_config.json or special_tokens_map.json."""
    out: dict[str, str] = {}
    if not path.is_dir():
        return out
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        f = path / fname
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{f}: not valid JSON ({_first_line(e)})") from None
        for name in ("bos", "eos", "pad", "unk"):
            v = cfg.get(f"{name}_token") if isinstance(cfg, dict) else None
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str) and v:
                out[name] = v
    return out


class HFTokenizer:
    """A Hugging Face tokenizer (a directory or a tokenizer.json file), run through `tokenizers`.

    Documents are separated by the tokenizer's BOS and EOS, as tokenizer_config.json names them
    (else the usual names: <s>, </s>, <|endoftext|>, ...); a tokenizer with only one of the two
    uses it for both, and PAD falls back to EOS. Encoding never adds the tokenizer's own
    specials (packing places BOS/EOS itself).
    """

    kind = "hf"

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        self.files = tokenizer_files(p)
        if not self.files:
            raise ConfigError(
                f"cannot load tokenizer {str(path)!r}: no tokenizer.json or tokenizer.model there"
            )
        self.source = p
        self._tok = _load_backend(p, self.files)
        self.sha256 = files_hash(self.files)
        self.name = f"hf:{self.sha256[:16]}"
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        named = _configured_specials(p)
        ids: dict[str, int | None] = {}
        for role, guesses in (("bos", BOS_NAMES), ("eos", EOS_NAMES), ("pad", PAD_NAMES),
                              ("unk", ())):  # fmt: skip
            tokens = [named[role]] if role in named else list(guesses)
            found = (self._tok.token_to_id(t) for t in tokens)
            ids[role] = next((i for i in found if i is not None), None)
        if ids["bos"] is None and ids["eos"] is None:
            raise ConfigError(
                f"tokenizer {str(path)!r} names no BOS or EOS token, and packing needs one between "
                "documents; set bos_token/eos_token in its tokenizer_config.json"
            )
        self.has_bos = ids["bos"] is not None  # else bos_id is the EOS standing in for it
        self.bos_id = ids["bos"] if ids["bos"] is not None else ids["eos"]
        self.eos_id = ids["eos"] if ids["eos"] is not None else ids["bos"]
        self.pad_id = ids["pad"] if ids["pad"] is not None else self.eos_id
        self.unk_id = ids["unk"]
        self.special_ids = special | {self.bos_id, self.eos_id, self.pad_id} | (
            {self.unk_id} if self.unk_id is not None else set()
        )

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, data: bytes | str) -> list[int]:
        if isinstance(data, bytes):
            data = data.decode("utf-8", errors="replace")
        return list(self._tok.encode(data, add_special_tokens=False).ids)

    def decode(self, ids) -> bytes:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        keep = [int(i) for i in ids if int(i) not in self.special_ids]
        return self._tok.decode(keep, skip_special_tokens=True).encode("utf-8")

    def encode_with_bytes(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """(ids, bytes each token covers) of one document; see the module docstring."""
        return self.encode_many([data])[0]

    def encode_many(self, datas: list[bytes]) -> list[tuple[np.ndarray, np.ndarray]]:
        texts, widths = zip(*(_as_text(d) for d in datas)) if datas else ((), ())
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        out = []
        for enc, w in zip(encs, widths):
            ids = np.asarray(enc.ids, dtype=np.int64)
            if not len(ids):
                out.append((ids, np.zeros(0, dtype=np.int64)))
                continue
            ends = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)[:, 1]
            cover = np.maximum.accumulate(w[ends])  # bytes covered once token i is read
            out.append((ids, np.diff(cover, prepend=0)))
        return out

    @cached_property
    def byte_lengths(self) -> np.ndarray:
        """Bytes of each id decoded alone: exact for byte-level BPE, an estimate otherwise (only
        used where no per-token counts were measured)."""
        return np.array(
            [0 if i in self.special_ids else len(self._tok.decode([i]).encode("utf-8"))
             for i in range(self.vocab_size)],
            dtype=np.int64,
        )  # fmt: skip

    # ------------------------------------------------------------------ checkpoints

    def identity(self) -> dict:
        return {"kind": "hf", "sha256": self.sha256, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "files": sorted(self.files)}  # fmt: skip

    def save_to(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name, f in self.files.items():
            shutil.copy2(f, directory / name)


def _as_text(data: bytes) -> tuple[str, np.ndarray]:
    """(text for the tokenizer, byte offset of each character boundary (len(text) + 1,)).

    Bytes that are not UTF-8 become U+FFFD for the tokenizer, one character per byte, and keep
    their width of one byte, so offsets always index the original bytes."""
    text = data.decode("utf-8", errors="surrogateescape")
    if text.isascii():
        return text, np.arange(len(text) + 1, dtype=np.int64)
    cp = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    width = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    escaped = (cp >= 0xDC80) & (cp <= 0xDCFF)
    if escaped.any():
        width[escaped] = 1
        text = "".join("\ufffd" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in text)
    return text, np.concatenate([[0], np.cumsum(width)])


def load_tokenizer(spec: str | Path | None = "byte") -> ByteTokenizer | HFTokenizer:
    """`byte` (or None) or a Hugging Face tokenizer: a directory or a tokenizer.json file."""
    if spec in (None, "", "byte"):
        return ByteTokenizer()
    if not Path(spec).exists():
        raise ConfigError(
            f"unknown tokenizer {str(spec)!r}: use 'byte', a tokenizer directory or a "
            "tokenizer.json file"
        )
    return HFTokenizer(spec)


get_tokenizer = load_tokenizer  # the earlier name


def check_vocab(tok, vocab_size: int, where: object, fix: str = "give the model's own tokenizer"
                ) -> None:  # fmt: skip
    """A tokenizer fits a model when every id it produces has an embedding row."""
    if tok.vocab_size > vocab_size:
        what = "the byte tokenizer" if tok.kind == "byte" else "the tokenizer"
        raise ConfigError(
            f"{where}: {what} has {tok.vocab_size} tokens, more than the model's embedding "
            f"({vocab_size} rows); {fix}"
        )


# ----------------------------------------------------------------------------- checkpoints


def _meta_tokenizer(ckpt_dir: Path) -> dict:
    try:
        meta = json.loads((ckpt_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    rec = meta.get("tokenizer") if isinstance(meta, dict) else None
    return rec if isinstance(rec, dict) else {}


def carried_tokenizer(ckpt_dir: str | Path, vocab_size: int) -> Path | ByteTokenizer | None:
    """What a checkpoint (or a Hugging Face directory) says its tokenizer is, without loading it:
    its tokenizer files' directory, the byte tokenizer (recorded in meta.json, or the byte
    vocabulary), or None (imported without a tokenizer)."""
    d = Path(ckpt_dir)
    for where in (d / TOKENIZER_DIR, d):
        if tokenizer_files(where) and where.is_dir():
            return where
    if _meta_tokenizer(d).get("kind") == "byte" or vocab_size == ByteTokenizer.vocab_size:
        return ByteTokenizer()
    return None


def tokenizer_hash(ckpt_dir: str | Path, vocab_size: int) -> str | None:
    """The content hash of a checkpoint's tokenizer (BYTE_HASH for the byte tokenizer)."""
    c = carried_tokenizer(ckpt_dir, vocab_size)
    if c is None:
        return None
    return BYTE_HASH if isinstance(c, ByteTokenizer) else files_hash(tokenizer_files(c))


def check_same_tokenizer(dirs: list[tuple[str | Path, int]], what: str) -> None:
    """Refuse to combine checkpoints ((directory, vocab_size) pairs) whose tokenizers differ."""
    known = [(str(d), h) for d, v in dirs if (h := tokenizer_hash(d, v)) is not None]
    for d, h in known[1:]:
        if h != known[0][1]:
            def show(x: str) -> str:
                return "the byte tokenizer" if x == BYTE_HASH else f"tokenizer {x[:12]}"

            raise ConfigError(
                f"{what}: {known[0][0]} uses {show(known[0][1])} but {d} uses {show(h)}; "
                "checkpoints with different tokenizers cannot be combined"
            )


def checkpoint_tokenizer(ckpt_dir: str | Path, vocab_size: int, override: str | None = None,
                         flag: str = "data.tokenizer=PATH"):  # fmt: skip
    """The tokenizer to read and write a checkpoint's tokens with: the one it carries; `override`
    (a tokenizer spec) only for a checkpoint imported without one, and refused when it differs
    from the carried one. `flag` is how the user passes a tokenizer, named in the message."""
    ckpt_dir = Path(ckpt_dir)
    carried = carried_tokenizer(ckpt_dir, vocab_size)
    if carried is None:
        if override in (None, "", "byte"):
            raise ConfigError(
                f"{ckpt_dir}: vocabulary of {vocab_size} tokens and no tokenizer in the "
                f"checkpoint (imported without one); pass the model's tokenizer: {flag}"
            )
        tok = load_tokenizer(override)
    else:
        tok = ByteTokenizer() if isinstance(carried, ByteTokenizer) else HFTokenizer(carried)
        if override not in (None, ""):
            other = load_tokenizer(override)
            mine = tok.identity()["sha256"]
            if other.identity()["sha256"] != mine:
                shown = "the byte tokenizer" if tok.kind == "byte" else f"tokenizer {mine[:12]}"
                raise ConfigError(
                    f"{ckpt_dir} carries {shown}, but {flag.split('=')[0]}={override} is another "
                    "one; a model is trained and evaluated with its own tokenizer (leave it unset "
                    "to use the checkpoint's)"
                )
    check_vocab(tok, vocab_size, ckpt_dir)
    return tok


def tokenizer_record(path: str | Path) -> dict | None:
    """meta.json's record of the tokenizer files at `path` (None when there are none)."""
    files = tokenizer_files(path) if Path(path).is_dir() else {}
    return {"kind": "hf", "sha256": files_hash(files), "files": sorted(files)} if files else None


def write_tokenizer(tok: Any, ckpt_dir: Path) -> dict:
    """Put a tokenizer into a checkpoint being written; returns its meta.json record.

    `tok`: a tokenizer object, or a directory of tokenizer files (carried from another
    checkpoint)."""
    if isinstance(tok, (str, Path)):
        files = tokenizer_files(tok)
        (ckpt_dir / TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
        for name, f in files.items():
            shutil.copy2(f, ckpt_dir / TOKENIZER_DIR / name)
        return tokenizer_record(ckpt_dir / TOKENIZER_DIR)
    if tok.kind != "byte":
        tok.save_to(ckpt_dir / TOKENIZER_DIR)
    return tok.identity()

def target_bytes(targets: torch.Tensor, byte_lengths: np.ndarray) -> torch.Tensor:
    """Raw bytes covered by each row's targets (B, L) -> (B,); IGNORE_INDEX counts zero."""
    table = torch.as_tensor(byte_lengths, dtype=torch.long)
    valid = targets != IGNORE_INDEX
    return (table[targets.clamp(min=0)] * valid).sum(-1)
