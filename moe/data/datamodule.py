"""`DomainDataModule`: per-domain corpora as Lightning dataloaders.

    dm = DomainDataModule(cfg, seed=1234)          # cfg: moe.config.DataConfig
    dm.setup()                                     # build (or load cached) tokenized corpora
    dm.train_dataloader()                          # infinite; batch i = f(seed, i)
    dm.val_dataloader()                            # one held-out loader per cfg.domains entry
    dm.heldout_loader("dna", batch_size=8, max_batches=16)
    dm.heldout_documents("dna")                    # [(tokens, bytes)] per held-out document
    dm.describe()                                  # one dict per domain, for `moe data`

Every batch is a dict: input_ids (B, L), targets (B, L) (IGNORE_INDEX = -100 where there is no
target), domain (B,) global domain ids (`dm.domain_names`), target_bytes (B,) raw bytes covered by
each row's targets (bits per byte = summed nats / summed target_bytes / ln 2).

Held-out documents: besides the packed stream, each held-out unit (a group's documents joined in
source order, e.g. a genome region; else one document) is tokenized alone with no special token,
for scoring whole documents at the model's context (moe.eval.rolling).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader
from tqdm import tqdm

from moe.config import DOMAINS, ConfigError, DataConfig, SourceConfig
from moe.data.corpus import Corpus, build_corpus, load_documents, source_for, summarize_origin
from moe.data.dedup import dedup_rule
from moe.data.documents import DNA_REGION, DNA_WINDOW, PIECE_MAX, PIECE_MIN, join_units
from moe.data.shipped import samples_digest
from moe.data.source_files import expand_paths
from moe.data.streams import (
    CollateHeldout,
    HeldoutSequences,
    PackedSequences,
    TrainBatches,
    domain_names,
    mixture_probs,
    pack_with_bytes,
    tokenize_units,
)
from moe.data.tokenizer import load_tokenizer

CACHE_FORMAT = 3  # bump when packing, document cutting, the split or the budget rule changes
UNIT_KEYS = ("heldout_docs", "heldout_offsets", "heldout_doc_bytes")


@dataclass
class DomainTokens:
    """One domain's tokenized corpus: packed train and held-out streams plus their statistics."""

    train: np.ndarray
    heldout: np.ndarray
    stats: dict  # documents, bytes, train_/heldout_ documents and bytes, origin, ...
    # bytes each token covers, aligned with train/heldout (tokenizers other than the byte one)
    train_nbytes: np.ndarray | None = None
    heldout_nbytes: np.ndarray | None = None
    # held-out documents (units), each tokenized alone without specials: document i is
    # heldout_docs[heldout_offsets[i]:heldout_offsets[i + 1]], heldout_doc_bytes[i] bytes long
    heldout_docs: np.ndarray | None = None
    heldout_offsets: np.ndarray | None = None
    heldout_doc_bytes: np.ndarray | None = None


_MEMORY: dict[str, DomainTokens] = {}  # in-process cache, keyed like the disk cache
_MEMORY_ENTRIES = 32  # enough for every domain of several configs; oldest entries go first


def _cache_key(domain: str, src: SourceConfig, cfg: DataConfig, tokenizer,
               whole: bool = False) -> str:  # fmt: skip
    ident: dict = {
        "format": CACHE_FORMAT, "domain": domain, "source": asdict(src),
        "budget": cfg.bytes_per_domain, "heldout_fraction": cfg.heldout_fraction,
        # the tokenizer's content hash ("byte" for the byte tokenizer)
        "tokenizer": getattr(tokenizer, "sha256", tokenizer.name),
        "dna_window": DNA_WINDOW, "dna_region": DNA_REGION,
        "piece_bytes": [PIECE_MIN, PIECE_MAX],
    }
    if whole:
        ident["whole"] = True  # an evaluation set: every document held out
    elif (rule := dedup_rule(cfg)) is not None:  # absent when off: older cache entries stay valid
        ident["dedup"] = [rule.shingle, rule.threshold]
    if src.kind == "builtin":
        ident["samples"] = samples_digest()  # the shipped files the built-in corpora read
    elif src.kind == "files":
        # a changed file must not be served from a stale cache
        ident["files"] = [(str(p), p.stat().st_size, p.stat().st_mtime_ns)
                          for p in expand_paths(src.paths, domain)]
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def _build_tokens(domain: str, src: SourceConfig, cfg: DataConfig, tokenizer,
                  whole: bool = False) -> DomainTokens:  # fmt: skip
    if whole:  # every document of the source is held out, in the source's order, no budget cut
        # (its files and FASTA records at their natural length: one group each)
        docs = load_documents(domain, src, cfg.bytes_per_domain, natural=True)
        if not docs:
            raise ConfigError(f"data: domain {domain!r} has an empty corpus (its source gave no "
                              "documents)")
        c = Corpus(domain=domain, train=(), heldout=tuple(docs), origin=summarize_origin(docs),
                   source_documents=len(docs), source_bytes=sum(len(d.data) for d in docs))
    else:
        c = build_corpus(domain, src, cfg.bytes_per_domain, cfg.heldout_fraction,
                         dedup_rule(cfg))
    train_bytes = sum(len(d.data) for d in c.train)
    held_bytes = sum(len(d.data) for d in c.heldout)
    stats = {
        "documents": len(c.train) + len(c.heldout), "bytes": train_bytes + held_bytes,
        "train_documents": len(c.train), "heldout_documents": len(c.heldout),
        "train_bytes": train_bytes, "heldout_bytes": held_bytes,
        "source_documents": c.source_documents, "source_bytes": c.source_bytes,
        "origin": c.origin,
    }
    if dedup_rule(cfg) is not None and not whole:
        stats["dedup_documents"], stats["dedup_bytes"] = c.dedup_documents, c.dedup_bytes
    (train, train_nb), (held, held_nb) = (pack_with_bytes(c.train, tokenizer),
                                          pack_with_bytes(c.heldout, tokenizer))
    docs, offsets, doc_bytes = tokenize_units(join_units(c.heldout), tokenizer)
    stats["heldout_units"] = len(doc_bytes)
    return DomainTokens(train, held, stats, train_nb, held_nb, docs, offsets, doc_bytes)


def _save(path: Path, t: DomainTokens) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.npz")
    os.close(fd)
    try:
        extra = {k: v for k in ("train_nbytes", "heldout_nbytes", *UNIT_KEYS)
                 if (v := getattr(t, k)) is not None}  # fmt: skip
        np.savez(tmp, train=t.train, heldout=t.heldout, stats=np.array(json.dumps(t.stats)),
                 **extra)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> DomainTokens | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            nb = {k: z[k] for k in ("train_nbytes", "heldout_nbytes", *UNIT_KEYS)
                  if k in z.files}  # fmt: skip
            if not all(k in nb for k in UNIT_KEYS):
                return None  # written before held-out documents were kept: rebuild it
            return DomainTokens(z["train"], z["heldout"], json.loads(str(z["stats"])), **nb)
    except (OSError, ValueError, KeyError):
        return None  # unreadable or foreign file: rebuild it


def domain_tokens(domain: str, cfg: DataConfig, tokenizer, whole: bool = False) -> DomainTokens:
    """Tokenized corpus of one domain: from memory, else `cfg.cache_dir`, else built.
    `whole`: every document is held out (an evaluation set)."""
    src = source_for(cfg, domain)
    key = _cache_key(domain, src, cfg, tokenizer, whole)
    if key in _MEMORY:
        return _MEMORY[key]
    path = Path(cfg.cache_dir) / f"{domain}-{key}.npz" if cfg.cache_dir else None
    tokens = _load(path) if path is not None and path.is_file() else None
    if tokens is None:
        tokens = _build_tokens(domain, src, cfg, tokenizer, whole)
        if path is not None:
            _save(path, tokens)
    while len(_MEMORY) >= _MEMORY_ENTRIES:
        _MEMORY.pop(next(iter(_MEMORY)))
    _MEMORY[key] = tokens
    return tokens


class DomainDataModule(pl.LightningDataModule):
    def __init__(self, cfg: DataConfig, seed: int = 0, tokenizer=None, start_step: int = 0,
                 heldout_only: frozenset[str] | set[str] = frozenset()):  # fmt: skip
        """`tokenizer`: default `cfg.tokenizer` (the byte tokenizer when unset).
        `heldout_only`: domains that are evaluation sets: all their documents are held out."""
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.tokenizer = tokenizer or load_tokenizer(cfg.tokenizer)
        self.heldout_only = frozenset(heldout_only)
        self.start_step = start_step
        self.domain_names = domain_names(cfg)
        for d in list(cfg.domains) + list(cfg.weights):
            self.domain_id(d)  # unknown domains fail here, before any corpus is built
        if not cfg.domains:
            raise ConfigError("data.domains: at least one domain is needed")
        if cfg.stream not in ("mixed", "separate", "per_domain"):
            raise ConfigError(f"data.stream: unknown stream {cfg.stream!r} (mixed, separate, "
                              "per_domain)")
        if cfg.stream == "separate" and len(cfg.domains) != 1:
            raise ConfigError("data.stream=separate needs exactly one domain in data.domains")
        self._tokens: dict[str, DomainTokens] = {}

    def domain_id(self, domain: str) -> int:
        if domain not in self.domain_names:
            raise ConfigError(
                f"data: unknown domain {domain!r}; built-in domains are {', '.join(DOMAINS)} "
                "(a new domain needs an entry under data.sources)"
            )
        return self.domain_names.index(domain)

    # ------------------------------------------------------------------ building

    def _ensure(self, domains: list[str]) -> None:
        todo = [d for d in domains if d not in self._tokens]
        # the bar appears only when building takes more than a second (cold corpora)
        bar = tqdm(todo, desc="building corpora", unit="domain", delay=1.0, file=sys.stderr,
                   disable=not todo or not sys.stderr.isatty())
        for d in bar:
            bar.set_postfix_str(d)
            self._tokens[d] = domain_tokens(d, self.cfg, self.tokenizer, d in self.heldout_only)

    def prepare_data(self) -> None:
        self._ensure(list(self.cfg.domains))

    def setup(self, stage: str | None = None) -> None:
        self._ensure(list(self.cfg.domains))

    def tokens(self, domain: str) -> DomainTokens:
        self.domain_id(domain)
        self._ensure([domain])
        return self._tokens[domain]

    def sequences(self, domain: str, split: str) -> PackedSequences:
        """Packed windows of one domain's `train` or `heldout` stream."""
        t = self.tokens(domain)
        train = split == "train"
        nb = t.train_nbytes if train else t.heldout_nbytes
        return PackedSequences(
            t.train if train else t.heldout, self.cfg.seq_len, self.domain_id(domain),
            self.tokenizer.byte_lengths if nb is None else None, self.tokenizer.pad_id,
            pad_tail=not train, token_bytes=nb,
        )

    # ------------------------------------------------------------------ loaders

    def train_batches(self, start_step: int | None = None) -> TrainBatches:
        self.setup()
        ids = [self.domain_id(d) for d in self.cfg.domains]
        seqs = {self.domain_id(d): self.sequences(d, "train") for d in self.cfg.domains}
        return TrainBatches(
            seqs, ids, self.cfg.stream, mixture_probs(self.cfg), self.cfg.batch_size, self.seed,
            start_step=self.start_step if start_step is None else start_step,
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_batches(), batch_size=None, num_workers=self.cfg.num_workers)

    def heldout_loader(self, domain: str, batch_size: int | None = None,
                       max_batches: int | None = None) -> DataLoader:
        """Held-out sequences of any known domain, in order; `max_batches` 0/None = all."""
        bs = batch_size or self.cfg.batch_size
        limit = max_batches * bs if max_batches else None
        seqs = self.sequences(domain, "heldout")
        if len(seqs) == 0:
            raise ConfigError(f"data: domain {domain!r} has no held-out sequences")
        return DataLoader(HeldoutSequences(seqs, limit), batch_size=bs, shuffle=False,
                          num_workers=self.cfg.num_workers,
                          collate_fn=CollateHeldout())

    def heldout_documents(self, domain: str) -> list[tuple[np.ndarray, int]]:
        """(tokens, bytes) of each held-out document of a domain, in held-out order (a hash
        order; an evaluation set's file order); each tokenized alone, without specials."""
        t = self.tokens(domain)
        off = t.heldout_offsets
        return [(t.heldout_docs[off[i] : off[i + 1]], int(t.heldout_doc_bytes[i]))
                for i in range(len(t.heldout_doc_bytes))]  # fmt: skip

    def val_dataloader(self) -> list[DataLoader]:
        return [self.heldout_loader(d) for d in self.cfg.domains]

    # ------------------------------------------------------------------ reporting

    def describe(self) -> list[dict]:
        """One row per domain of `cfg.domains`: sizes of the corpus and of each split."""
        rows = []
        for d in self.cfg.domains:
            s = self.tokens(d).stats
            src = source_for(self.cfg, d)
            rows.append({
                "domain": d, "domain_id": self.domain_id(d), "source": src.kind,
                "documents": s["documents"], "bytes": s["bytes"],
                "train_documents": s["train_documents"],
                "heldout_documents": s["heldout_documents"],
                "train_bytes": s["train_bytes"], "heldout_bytes": s["heldout_bytes"],
                "train_sequences": len(self.sequences(d, "train")),
                "heldout_sequences": len(self.sequences(d, "heldout")),
                "source_documents": s["source_documents"], "source_bytes": s["source_bytes"],
                "origin": s["origin"],
                # data.dedup: held-out documents and bytes dropped as duplicates of training
                **{k: s[k] for k in ("dedup_documents", "dedup_bytes") if k in s},
            })
        return rows
