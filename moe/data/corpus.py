"""One domain's corpus: pick its source, load documents, split held-out and take the byte budget
(moe.data.documents.select).

Loading is cached in-process (tests and `moe eval` build the same corpora many times); the
datamodule adds an optional on-disk cache of the tokenized result. `dedup` (a
moe.data.dedup.DedupRule, from `data.dedup`): licence headers stripped from the built-in code and
held-out documents that duplicate training dropped; None (the default) leaves corpora as they were.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache

from moe.config import DOMAINS, ConfigError, DataConfig, SourceConfig
from moe.data.dedup import DedupRule, drop_duplicates
from moe.data.documents import Document, select
from moe.data.source_code import code_documents
from moe.data.source_dna import dna_documents
from moe.data.source_files import files_documents
from moe.data.source_hf import hf_documents
from moe.data.source_text import text_documents

BUILTIN = {"text": text_documents, "code": code_documents, "dna": dna_documents}


@dataclass(frozen=True)
class Corpus:
    domain: str
    train: tuple[Document, ...]
    heldout: tuple[Document, ...]
    origin: str  # human-readable summary of where the documents come from
    source_documents: int  # documents the source offered before the byte budget
    source_bytes: int
    # data.dedup: held-out documents and bytes dropped as duplicates of training (over the whole
    # held-out side of the split, before the budget)
    dedup_documents: int = 0
    dedup_bytes: int = 0


def source_for(cfg: DataConfig, domain: str) -> SourceConfig:
    """The domain's source: its `data.sources` entry, else the built-in corpus."""
    if domain in cfg.sources:
        return cfg.sources[domain]
    if domain not in DOMAINS:
        raise ConfigError(
            f"data: unknown domain {domain!r}; built-in domains are {', '.join(DOMAINS)} "
            "(a new domain needs an entry under data.sources)"
        )
    return SourceConfig()


def source_key(src: SourceConfig) -> str:
    return json.dumps(asdict(src), sort_keys=True)


def load_documents(domain: str, src: SourceConfig, budget: int, natural: bool = False,
                   strip_headers: bool = False) -> list[Document]:  # fmt: skip
    """All documents the source offers for this domain (before the byte budget). `natural`: an
    evaluation set's, grouped into whole files and FASTA records (moe.data.source_files).
    `strip_headers`: the built-in code without licence headers (moe.data.dedup)."""
    return list(_load_documents(domain, source_key(src), budget if src.kind == "hf" else 0,
                                natural, strip_headers))  # fmt: skip


@lru_cache(maxsize=16)
def _load_documents(domain: str, key: str, budget: int, natural: bool = False,
                    strip_headers: bool = False) -> tuple[Document, ...]:  # fmt: skip
    src = SourceConfig(**json.loads(key))
    if src.kind == "builtin":
        if domain not in BUILTIN:
            raise ConfigError(
                f"data.sources.{domain}: no built-in corpus for domain {domain!r}; "
                "use kind=files or kind=hf"
            )
        make = BUILTIN[domain]
        docs = (code_documents(domain, strip_headers=True) if strip_headers
                and make is code_documents else make(domain))  # fmt: skip
    elif src.kind == "files":
        if not src.paths:
            raise ConfigError(f"data.sources.{domain}.paths: kind=files needs at least one path")
        docs = files_documents(src, domain, natural)
    elif src.kind == "hf":
        if not src.name:
            raise ConfigError(f"data.sources.{domain}.name: kind=hf needs a dataset name")
        docs = hf_documents(src, domain, budget)
    else:
        raise ConfigError(f"data.sources.{domain}.kind: unknown kind {src.kind!r} (builtin, "
                          "files, hf)")
    return tuple(docs)


def summarize_origin(docs: list[Document]) -> str:
    counts = Counter(d.origin for d in docs)
    return "; ".join(f"{o}, {n:,} documents" for o, n in sorted(counts.items()))


def build_corpus(domain: str, src: SourceConfig, budget: int, heldout_fraction: float,
                 dedup: DedupRule | None = None) -> Corpus:  # fmt: skip
    return _build_corpus(domain, source_key(src), budget, heldout_fraction, dedup)


@lru_cache(maxsize=16)
def _build_corpus(domain: str, key: str, budget: int, heldout_fraction: float,
                  dedup: DedupRule | None = None) -> Corpus:  # fmt: skip
    src = SourceConfig(**json.loads(key))
    docs = load_documents(domain, src, budget, strip_headers=dedup is not None)
    if not docs:
        raise ConfigError(f"data: domain {domain!r} has an empty corpus (its source gave no "
                          "documents)")
    dropped: list[Document] = []

    def keep(train: list[Document], held: list[Document]) -> list[Document]:
        kept = drop_duplicates(train, held, dedup)
        ids = {d.doc_id for d in kept}
        dropped.extend(d for d in held if d.doc_id not in ids)
        return kept

    train, held = select(docs, budget, heldout_fraction, domain,
                         heldout_filter=keep if dedup is not None else None)  # fmt: skip
    return Corpus(
        domain=domain, train=tuple(train), heldout=tuple(held), origin=summarize_origin(docs),
        source_documents=len(docs), source_bytes=sum(len(d.data) for d in docs),
        dedup_documents=len(dropped), dedup_bytes=sum(len(d.data) for d in dropped),
    )
