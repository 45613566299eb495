"""Tokenizers: the shared byte-level tokenizer (default) and an optional Hugging Face wrapper.

Every tokenizer exposes `byte_lengths`: a numpy array (vocab_size,) holding how many raw bytes each
token id stands for (0 for specials). Bits per byte of a batch is then
`nats / byte_lengths[targets].sum() / ln 2`, the same formula for any tokenizer, so models with
different vocabularies stay comparable. For the byte tokenizer this count is exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from moe.config import ConfigError

IGNORE_INDEX = -100  # target id that contributes no loss (same value as moe.model.transformer)


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
    BOS = 256
    EOS = 257
    PAD = 258
    vocab_size = 259
    bos_id, eos_id, pad_id = BOS, EOS, PAD

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


class HFTokenizer:
    """A local Hugging Face tokenizer directory (needs `transformers`, the `hf` extra).

    Byte lengths per token are measured by decoding each id on its own; for byte-level BPE
    vocabularies this is exact, for others (sentencepiece word boundaries) it is close.
    """

    def __init__(self, path: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ConfigError(
                f"tokenizer {path!r} needs the transformers package (pip install 'moe-forge[hf]')"
            ) from None
        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises many types (OSError, ValueError, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"cannot load tokenizer {path!r}: {first}") from None
        t = self._tok
        self.name = f"hf:{Path(path).resolve()}"
        self.vocab_size = len(t)
        fallback = t.eos_token_id if t.eos_token_id is not None else 0
        self.bos_id = t.bos_token_id if t.bos_token_id is not None else fallback
        self.eos_id = fallback
        self.pad_id = t.pad_token_id if t.pad_token_id is not None else fallback
        special = set(t.all_special_ids)
        self.byte_lengths = np.array(
            [0 if i in special else len(t.decode([i]).encode("utf-8")) for i in range(len(t))],
            dtype=np.int64,
        )

    def encode(self, data: bytes | str) -> list[int]:
        if isinstance(data, bytes):
            data = data.decode("utf-8", errors="replace")
        return list(self._tok.encode(data, add_special_tokens=False))

    def decode(self, ids) -> bytes:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=True).encode("utf-8")


def get_tokenizer(name_or_path: str | None = "byte") -> ByteTokenizer | HFTokenizer:
    """`byte` (default) or a local Hugging Face tokenizer directory."""
    if name_or_path in (None, "", "byte"):
        return ByteTokenizer()
    if not Path(name_or_path).is_dir():
        raise ConfigError(
            f"unknown tokenizer {name_or_path!r}: use 'byte' or a local tokenizer directory"
        )
    return HFTokenizer(name_or_path)


def target_bytes(targets: torch.Tensor, byte_lengths: np.ndarray) -> torch.Tensor:
    """Raw bytes covered by each row's targets (B, T) -> (B,); IGNORE_INDEX counts zero."""
    table = torch.as_tensor(byte_lengths, dtype=torch.long)
    valid = targets != IGNORE_INDEX
    return (table[targets.clamp(min=0)] * valid).sum(-1)
