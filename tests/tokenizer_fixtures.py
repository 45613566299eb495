"""Small BPE tokenizers (trained here with `tokenizers` on a few KB of the built-in text corpus)
and checkpoints that carry them, for the tokenizer tests and bad-input cases."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ["<|endoftext|>", "<pad>"]


def sample_text(n_bytes: int = 6000, skip: int = 0) -> str:
    """A few KB of the built-in text corpus (real prose), as one string."""
    from moe.data.source_text import text_documents

    docs = text_documents("text")[skip:]
    out, total = [], 0
    for d in docs:
        out.append(d.data.decode("utf-8", errors="replace"))
        total += len(d.data)
        if total >= n_bytes:
            break
    return "\n\n".join(out)


def bpe_tokenizer(path: Path, vocab_size: int = 400, skip: int = 0) -> Path:
    """A byte-level BPE tokenizer directory: tokenizer.json + tokenizer_config.json naming
    <|endoftext|> as BOS and EOS, <pad> as PAD. `skip` trains it on other text (another
    tokenizer of the same size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if (path / "tokenizer.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator([sample_text(skip=skip)], trainer)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
           "eos_token": "<|endoftext|>", "pad_token": "<pad>"}  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


def bpe_checkpoint(path: Path, tok_dir: Path, vocab_size: int = 400, seed: int = 0,
                   domain: str | None = None) -> Path:  # fmt: skip
    """A tiny random dense checkpoint carrying the tokenizer at `tok_dir`."""
    from generate_fixtures import tiny_model

    from moe.data.tokenizer import load_tokenizer
    from moe.io.checkpoint import make_meta, save_checkpoint

    if path.exists():
        return path
    m = tiny_model(seed, vocab_size=vocab_size)
    return save_checkpoint(path, m.state_dict(), m.config,
                           make_meta(kind="branch", domain=domain, family=domain),
                           tokenizer=load_tokenizer(tok_dir))  # fmt: skip


def two_tokenizer_checkpoints(root: Path) -> tuple[Path, Path]:
    """Two same-shape checkpoints (vocab 400) whose BPE tokenizers differ, one seed lineage."""
    a = bpe_checkpoint(root / "ck-a", bpe_tokenizer(root / "tok-a"), domain="text")
    b = bpe_checkpoint(root / "ck-b", bpe_tokenizer(root / "tok-b", skip=40), seed=1,
                       domain="code")  # fmt: skip
    return a, b


def merge_yaml(root: Path, a: Path, b: Path) -> Path:
    y = root / "merge-two-tokenizers.yaml"
    y.write_text(f"merge_method: linear\nallow_cross_family: true\nmodels:\n"
                 f"  - model: {a}\n  - model: {b}\n")  # fmt: skip
    return y


def hand_bpb(model, ids: list[int], n_bytes: int) -> float:
    """Bits per byte of one document computed directly from the logits: nats of every target
    (ids[1:], each read after the ids before it; ids[0] is the prefix, BOS) over the document's
    UTF-8 bytes."""
    import math

    x = torch.tensor([ids[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits.double(), -1)[0]
    nats = -sum(float(logp[i, t]) for i, t in enumerate(ids[1:]))
    return nats / n_bytes / math.log(2)
