"""Small checkpoints for `moe generate` tests and bad-input cases (random weights, built in
well under a second, no training)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["[UNK]", "<s>", "</s>", "hello", "world", "the", "expert", "writes", "code", "dna"]


def tiny_config(experts=(), router="learned", vocab_size=259, max_seq_len=64, **kw):
    from moe.config import ModelConfig, MoEConfig

    moe = MoEConfig(experts=list(experts), router=router, top_k=2 if router == "learned" else 1)
    return ModelConfig(
        size="debug", vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
        ffn_dim=48, max_seq_len=max_seq_len, moe=moe, **kw,
    )  # fmt: skip


def tiny_model(seed=0, **kw):
    from moe.model.transformer import Transformer

    torch.manual_seed(seed)
    return Transformer(tiny_config(**kw)).eval()


def save_tiny(path: Path, seed=0, kind="dense", **kw) -> Path:
    from moe.io.checkpoint import make_meta, save_checkpoint

    m = tiny_model(seed, **kw)
    return save_checkpoint(path, m.state_dict(), m.config, make_meta(kind=kind))


def word_tokenizer(path: Path) -> Path:
    """A Hugging Face word-level tokenizer directory (10 words, [UNK] for anything else)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]",
           "bos_token": "<s>", "eos_token": "</s>"}  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


def word_checkpoint(path: Path, seed=0) -> Path:
    """A dense checkpoint with its own (word-level) tokenizer in tokenizer/, as `moe import`
    leaves an imported model."""
    save_tiny(path, seed, vocab_size=len(WORDS))
    word_tokenizer(path / "tokenizer")
    return path


def no_tokenizer_checkpoint(path: Path, seed=0) -> Path:
    """A checkpoint whose vocabulary is not the byte tokenizer's and that carries no tokenizer."""
    return save_tiny(path, seed, vocab_size=300)
