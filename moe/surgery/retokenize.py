"""`moe retokenize`: move a checkpoint to a new tokenizer, keeping every middle layer.

    moe retokenize CKPT --out OUT --vocab-size 512            # train a byte-level BPE
    moe retokenize CKPT --out OUT --tokenizer tok/             # or bring one
    moe retokenize CKPT --out OUT --vocab-size 512 --steps 300 --freeze-body

1. The tokenizer: a byte-level BPE trained with `tokenizers` on the train split of the
   checkpoint's own corpora (never the held-out documents it is evaluated on), or a given one.
   Either must encode every byte: a tokenizer that cannot (an unknown token, or a lossy round
   trip, on any ASCII character or on multi-byte UTF-8) is refused.
2. Embeddings: each new token's input row (and output row, when untied) is the mean of the old
   rows of the old tokens that spell its bytes (`--init mean`; for a byte-level source, the
   bytes themselves), or fresh N(0, init_std²) rows (`--init random`). BOS/EOS/PAD take the
   old BOS/EOS/PAD rows. Every other tensor is copied.
3. Optionally `--steps N` of training (a `moe train` stage: resumable, key=value overrides):
   the embeddings only with `--freeze-body` (optim.trainable=embeddings), else everything.
   Then OUT is a run directory: OUT/retok the untrained checkpoint, OUT/model the trained one.

Bits per byte stay comparable: every evaluation divides by the UTF-8 bytes each target covers,
whatever the tokenizer (moe/data/tokenizer.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import torch

from moe.config import ConfigError, DataConfig, ModelConfig

INITS = ("mean", "random")
SPECIALS = ["<|endoftext|>", "<pad>"]
# probes of "every byte": each ASCII character alone, and a 2-, 3- and 4-byte UTF-8 character
PROBES = [chr(b) for b in range(128)] + ["é", "中", "😀", "\ufffd"]


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet (what `ByteLevel` pre-tokenizers emit): char -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tok) -> list[bytes | None]:
    """The bytes each token id spells (None for specials): exact for byte-level tokens (their
    string is in the byte-level alphabet), else the token decoded alone as UTF-8."""
    if tok.kind == "byte":
        return [bytes([i]) for i in range(256)] + [None] * (tok.vocab_size - 256)
    alpha = _byte_alphabet()
    out: list[bytes | None] = []
    for i in range(tok.vocab_size):
        if i in tok.special_ids:
            out.append(None)
            continue
        s = tok._tok.id_to_token(i)
        if s is not None and s and all(c in alpha for c in s):
            out.append(bytes(alpha[c] for c in s))
        else:
            out.append(tok._tok.decode([i]).encode("utf-8"))
    return out


def check_covers_bytes(tok, where: str) -> None:
    """Refuse a tokenizer that cannot encode some text (see the module docstring)."""
    if tok.kind == "byte":
        return
    for ch in PROBES:
        ids = tok.encode(ch)
        bad = not ids or (tok.unk_id is not None and tok.unk_id in ids) or tok.decode(ids) != (
            ch.encode("utf-8"))  # fmt: skip
        if bad:
            shown = f"byte 0x{ord(ch):02x}" if ord(ch) < 128 else f"character {ch!r}"
            raise ConfigError(f"{where}: the tokenizer cannot encode {shown} (some text would be "
                              "unencodable); a byte-level BPE covers every byte (moe retokenize "
                              "--vocab-size N trains one)")  # fmt: skip


def train_bpe(data: DataConfig, vocab_size: int, out_dir: Path) -> Path:
    """A byte-level BPE of `vocab_size` tokens trained on the train split of `data`'s corpora;
    tokenizer.json + tokenizer_config.json (BOS = EOS = <|endoftext|>, PAD = <pad>) in out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from moe.data.corpus import build_corpus, source_for

    if vocab_size < 256 + len(SPECIALS):
        raise ConfigError(f"retokenize --vocab-size {vocab_size}: a byte-level BPE needs at least "
                          f"{256 + len(SPECIALS)} tokens (256 bytes + specials)")  # fmt: skip
    texts = []
    for d in data.domains:
        c = build_corpus(d, source_for(data, d), data.bytes_per_domain, data.heldout_fraction)
        texts += [doc.data.decode("utf-8", errors="replace") for doc in c.train]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[0],
           "eos_token": SPECIALS[0], "pad_token": SPECIALS[1]}  # fmt: skip
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out_dir


def new_embeddings(old_w: torch.Tensor, old_tok, new_tok, init: str, std: float,
                   gen: torch.Generator) -> torch.Tensor:  # fmt: skip
    """(V_new, C) rows for the new tokenizer from the old rows (V_old, C)."""
    V, C = new_tok.vocab_size, old_w.shape[1]
    if init == "random":
        out = torch.randn(V, C, generator=gen) * std
    else:
        out = torch.empty(V, C)
        mean_all = old_w.float().mean(0)  # (C,)
        for i, b in enumerate(token_bytes(new_tok)):
            ids = old_tok.encode(b) if b else []
            out[i] = old_w[ids].float().mean(0) if ids else mean_all  # mean of spelled rows
    for role in ("bos_id", "eos_id", "pad_id"):  # separators keep their old meaning
        out[getattr(new_tok, role)] = old_w[getattr(old_tok, role)].float()
    return out.to(old_w.dtype)


def retokenize_state(cfg: ModelConfig, sd: dict[str, torch.Tensor], old_tok, new_tok,
                     init: str = "mean", seed: int = 0) -> tuple[ModelConfig, dict]:  # fmt: skip
    if init not in INITS:
        raise ConfigError(f"retokenize --init: {init!r}; choose one of {', '.join(INITS)}")
    gen = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in sd.items()}
    out["tok_emb.weight"] = new_embeddings(sd["tok_emb.weight"], old_tok, new_tok, init,
                                           cfg.init_std, gen)  # fmt: skip
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = new_embeddings(sd["lm_head.weight"], old_tok, new_tok, init,
                                               cfg.init_std, gen)  # fmt: skip
    return dataclasses.replace(cfg, vocab_size=new_tok.vocab_size), out


def retokenize_checkpoint(source: str | Path, out: str | Path, vocab_size: int | None = None,
                          tokenizer: str | None = None, init: str = "mean", steps: int = 0,
                          freeze_body: bool = False, overrides: list[str] | None = None,
                          seed: int = 0, overwrite: bool = False) -> Path:  # fmt: skip
    """`moe retokenize` (see the module docstring); every check before anything is written."""
    from moe.data.tokenizer import checkpoint_tokenizer, load_tokenizer
    from moe.eval.evaluate import data_config_of, resolve_checkpoint
    from moe.io.checkpoint import CheckpointError, is_checkpoint, load_checkpoint, read_meta
    from moe.io.output import claim
    from moe.surgery.grow import write_surgery_checkpoint
    from moe.surgery.shrink import _heal_recipe, run_stage

    if (vocab_size is None) == (tokenizer is None):
        raise ConfigError("retokenize: give one of --vocab-size N (train a BPE) or --tokenizer "
                          "PATH" + (", not both" if tokenizer is not None else ""))
    if init not in INITS:
        raise ConfigError(f"retokenize --init: {init!r}; choose one of {', '.join(INITS)}")
    if steps < 0:
        raise ConfigError(f"retokenize --steps {steps}: must be >= 0")
    if (freeze_body or overrides) and not steps:
        raise ConfigError("retokenize: --freeze-body and key=value configure training; give "
                          "--steps")  # fmt: skip
    src_dir = resolve_checkpoint(source)
    out = Path(out)
    target = out / "retok" if steps else out
    record = {"vocab_size": vocab_size, "tokenizer": tokenizer, "init": init, "steps": steps,
              "freeze_body": freeze_body, "overrides": list(overrides or []),
              "seed": seed}  # fmt: skip
    reuse = False
    if out.exists() and not overwrite:
        prev = read_meta(target).get("recipe", {}).get("retokenize") if is_checkpoint(
            target) else None  # fmt: skip
        same = prev is not None and {k: prev.get(k) for k in record} == record
        if not (steps and same and prev.get("source") == str(src_dir)):
            raise CheckpointError(f"{out} already exists (pass --overwrite to replace it)")
        reuse = True
    with claim(out, [source, tokenizer]):  # moe/io/output.py
        ck = load_checkpoint(src_dir)
        old_tok = checkpoint_tokenizer(src_dir, ck.config.vocab_size)
        data, dseed = data_config_of(ck.meta)
        data = dataclasses.replace(data, tokenizer=None)  # the stage uses the checkpoint's own
        with tempfile.TemporaryDirectory() as tmp:
            if not reuse:
                tok_dir = Path(tokenizer) if tokenizer else train_bpe(data, vocab_size, Path(tmp))
                new_tok = load_tokenizer(tok_dir)
                if new_tok.kind == "byte":
                    raise ConfigError("retokenize --tokenizer: give a Hugging Face tokenizer (the "
                                      "byte tokenizer is the default one)")  # fmt: skip
                check_covers_bytes(new_tok, f"retokenize --tokenizer {tok_dir}")
                cfg, sd = retokenize_state(ck.config, ck.state_dict, old_tok, new_tok, init, seed)
            stage = None
            if steps:
                extra = ["optim.trainable=embeddings"] if freeze_body else []
                stage = _heal_recipe(ck, target, out, data, dseed, steps,
                                     extra + list(overrides or []),
                                     "retokenize training")  # fmt: skip
            if not reuse:
                if steps and overwrite and out.exists():
                    shutil.rmtree(out)
                write_surgery_checkpoint(src_dir, ck, cfg, sd, target, "retokenize", record,
                                         overwrite, tokenizer=new_tok)  # fmt: skip
        return run_stage(out, stage) if stage is not None else target
