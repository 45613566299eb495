"""Documents and the corpus-level steps every source shares: FASTA parsing, splitting long texts
into blocks, byte-budget balance and the held-out split.

A document is the unit of the held-out split, so sources cut large files (a play, a genome) into
many documents of a few kilobytes; otherwise one file would be all training or all held-out.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from moe.config import ConfigError

DNA_WINDOW = 1024  # bases per DNA document
BLOCK_BYTES = 2048  # target size of a text document built from blank-line blocks


@dataclass(frozen=True)
class Document:
    doc_id: str  # unique within its domain and stable across runs and machines
    data: bytes
    domain: str
    origin: str  # human-readable source, e.g. "tinyshakespeare (moe/data/samples/text)"


# ----------------------------------------------------------------------------- FASTA


def parse_fasta(raw: bytes, where: str = "FASTA") -> list[tuple[str, bytes]]:
    """Records of a FASTA file as (record id, sequence).

    The id is the header's first word. Wrapped lines are joined, whitespace dropped and bases
    upper-cased: soft-masking (lower case marks repeats) is annotation, not sequence, and keeping
    it would give the model two spellings of each base. N and other IUPAC letters are kept as they
    are (upper-cased): they are real symbols of real genomes. `;` comment lines are skipped.
    """
    records: list[tuple[str, bytes]] = []
    name: str | None = None
    parts: list[bytes] = []
    for line in raw.splitlines():
        line = line.strip()
        if not line or line.startswith(b";"):
            continue
        if line.startswith(b">"):
            if name is not None and parts:
                records.append((name, b"".join(parts)))
            header = line[1:].decode("utf-8", errors="replace").split()
            name = header[0] if header else f"record{len(records)}"
            parts = []
            continue
        if name is None:
            raise ConfigError(f"{where}: not FASTA (sequence before the first '>' header line)")
        parts.append(re.sub(rb"\s+", b"", line).upper())
    if name is not None and parts:
        records.append((name, b"".join(parts)))
    return records


def fasta_documents(
    raw: bytes, prefix: str, domain: str, origin: str, window: int = DNA_WINDOW
) -> list[Document]:
    """Each FASTA record cut into windows of `window` bases (the last one may be shorter)."""
    docs = []
    for rec_id, seq in parse_fasta(raw, where=prefix):
        for start in range(0, len(seq), window):
            docs.append(Document(f"{prefix}/{rec_id}/{start}", seq[start : start + window],
                                 domain, origin))
    return docs


# ----------------------------------------------------------------------------- text blocks


def split_blocks(data: bytes, target: int = BLOCK_BYTES) -> list[bytes]:
    """Group blank-line-separated blocks (speeches, paragraphs) into pieces of about `target`
    bytes, never cutting inside a block; the pieces concatenate back to `data`."""
    blocks = re.split(rb"(?<=\n\n)", data)
    out: list[bytes] = []
    cur: list[bytes] = []
    size = 0
    for b in blocks:
        if not b:
            continue
        cur.append(b)
        size += len(b)
        if size >= target:
            out.append(b"".join(cur))
            cur, size = [], 0
    if cur:
        out.append(b"".join(cur))
    return out


# ----------------------------------------------------------------------------- balance, split


def _unit_hash(key: str) -> float:
    """A deterministic number in [0, 1) for a string (sha1: stable across runs and machines)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def balance(docs: Iterable[Document], budget: int, domain: str) -> list[Document]:
    """The first `budget` bytes of the documents in a fixed pseudo-random order.

    The order is by hash of the document id, not a shuffle seeded by the run's seed: every run and
    every model then sees the same corpus and the same held-out documents, which keeps evaluations
    comparable. The last document taken is truncated so the total is exactly the budget (when the
    corpus is large enough).
    """
    ordered = sorted(docs, key=lambda d: (_unit_hash(f"order/{domain}/{d.doc_id}"), d.doc_id))
    if not ordered or not any(d.data for d in ordered):
        raise ConfigError(f"data: domain {domain!r} has an empty corpus (no documents with bytes)")
    out, total = [], 0
    for d in ordered:
        if total >= budget:
            break
        if not d.data:
            continue
        take = d.data[: budget - total]
        out.append(d if len(take) == len(d.data) else Document(d.doc_id, take, d.domain, d.origin))
        total += len(take)
    return out


def is_heldout(doc: Document, fraction: float) -> bool:
    return _unit_hash(f"{doc.domain}/{doc.doc_id}") < fraction


def heldout_split(docs: list[Document], fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, held-out) by a hash of each document id: deterministic, disjoint.

    When the hash leaves one side empty, the document nearest the threshold moves over, so both
    sides have at least one document whenever the corpus has two.
    """
    if len(docs) < 2:
        dom = docs[0].domain if docs else "?"
        raise ConfigError(
            f"data: domain {dom!r} has {len(docs)} document(s); the held-out split needs at "
            "least 2 (add data or raise data.bytes_per_domain)"
        )
    keyed = sorted(docs, key=lambda d: (_unit_hash(f"{d.domain}/{d.doc_id}"), d.doc_id))
    n_held = sum(is_heldout(d, fraction) for d in keyed)
    n_held = min(max(n_held, 1), len(keyed) - 1)
    held = keyed[:n_held]
    held_ids = {d.doc_id for d in held}
    # keep the caller's order (the balanced order) inside each side
    train = [d for d in docs if d.doc_id not in held_ids]
    held = [d for d in docs if d.doc_id in held_ids]
    return train, held
