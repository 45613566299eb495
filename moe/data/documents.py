"""Documents and the corpus-level steps every source shares: FASTA parsing, cutting long texts
into pieces, the held-out split and the byte budget.

A document is the unit of the held-out count, so sources cut large files (a novel, a source
file, a genome) into pieces of a few hundred bytes: the held-out split is a tenth of a budget
of a few hundred kilobytes, and it needs a hundred documents or more to measure a domain, not
a handful. Documents that must not be separated (the windows of one genome region) share a
`group`: the group, not the document, is then the unit of the held-out split and of the budget.

How a domain's corpus is chosen (`select`):
1. Held-out split, by unit: a unit (a group, else one document) is held out when a hash of its
   key is below `heldout_fraction`, so its side never depends on the budget, on the machine or
   (except when a source would have no unit on one side) on which other units exist.
2. Budget, per side: held-out takes `heldout_fraction` of the budget, training the rest (when
   one side runs out, the other takes what is left). Within a side, every source (documents of
   one `origin`: a novel collection, a genome, a file) gets a share proportional to its bytes
   on that side, and fills it with its units in a fixed hash order, whole units first, the last
   document cut to fit. So a small source is never crowded out by chance, and a larger budget
   only adds documents: the held-out set of 400 KB is inside the held-out set of 1 MB.
3. Order: the kept units of all sources in hash order (a group's documents in source order), so
   the first held-out batches already mix every source.
With `data.dedup` on, held-out units that copy the budgeted training set (more than half their
bytes in 50-byte windows found in it) are dropped before the held-out side takes its share of the
budget (moe.data.dedup). The split by unit, the training set and the order stay as above; the
held-out set is then a function of the budget too (a larger training set can cover more held-out
units), so it is no longer always inside a larger budget's held-out set.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from moe.config import ConfigError

# A document is 128-512 bytes (about 300 on average on the built-in corpora): at the default
# budget of 400 KB and held-out fraction 0.1, the 40 KB held out hold 100 documents or more.
PIECE_MIN = 128  # pieces grow block by block until at least this long
PIECE_MAX = 512  # ... and never beyond this (a longer block is cut at a sentence or line end)
DNA_WINDOW = 256  # bases per DNA document
DNA_REGION = 4096  # bases per genome region: the held-out unit of a genome (16 windows)


@dataclass(frozen=True)
class Document:
    doc_id: str  # unique within its domain and stable across runs and machines
    data: bytes
    domain: str
    origin: str  # human-readable source, e.g. "tinyshakespeare (moe/data/samples/text)"
    group: str = ""  # documents sharing a group are held out (and budgeted) together

    @property
    def unit(self) -> str:
        return self.group or self.doc_id


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
    raw: bytes, prefix: str, domain: str, origin: str, window: int = DNA_WINDOW,
    region: int = DNA_REGION,
) -> list[Document]:
    """Each FASTA record cut into windows of `window` bases (the last one may be shorter),
    grouped into contiguous regions of `region` bases (`region=0`: the whole record is the
    group, as an evaluation set reads it).

    Whole regions go to training or to held-out: random single windows would put most held-out
    windows right beside training windows of the same genome, continuing the same sequence.
    """
    if region % window:
        raise ValueError(f"region {region} is not a multiple of window {window}")
    docs = []
    for rec_id, seq in parse_fasta(raw, where=prefix):
        for start in range(0, len(seq), window):
            group = (f"{prefix}/{rec_id}@{start - start % region}" if region
                     else f"{prefix}/{rec_id}")  # fmt: skip
            docs.append(Document(f"{prefix}/{rec_id}/{start}", seq[start : start + window],
                                 domain, origin, group))
    return docs


# ----------------------------------------------------------------------------- text pieces

# A sentence's end: its punctuation, closing quotes or brackets, and the whitespace after it.
_SENTENCE_END = re.compile(rb"(?<=[.!?;:])[\"')\]]*\s+")
_CLOSERS = b" \t\r\n)]}"


def _cut_long(block: bytes, limit: int, prose: bool) -> list[bytes]:
    """A block longer than `limit` cut into pieces of at most `limit` bytes.

    Each piece ends at the last line end that fits, or for prose at the last sentence end in
    its second half when there is one (novels wrap lines in mid-sentence); a single line longer
    than `limit` is cut hard.
    """
    out = []
    while len(block) > limit:
        cut = block.rfind(b"\n", 0, limit) + 1
        if prose:
            ends = [m.end() for m in _SENTENCE_END.finditer(block, limit // 2, limit)]
            cut = ends[-1] if ends else cut
        cut = cut or limit
        out.append(block[:cut])
        block = block[cut:]
    if block:
        out.append(block)
    return out


def split_blocks(data: bytes, target: int = PIECE_MIN, limit: int = PIECE_MAX,
                 prose: bool = True) -> list[bytes]:
    """`data` cut into pieces of `target` to `limit` bytes that concatenate back to `data`.

    Blank-line-separated blocks (paragraphs, speeches, groups of statements) are joined until a
    piece reaches `target`; a block that would take it past `limit` starts the next piece, and a
    block longer than `limit` is cut at sentence ends (prose) or line ends (code). For code a new
    top-level statement (a line starting at column 0: `def`, `class`, `func`, a comment) starts
    a new piece once the current one holds half the target, so pieces tend to follow definitions.
    """
    out: list[bytes] = []
    cur: list[bytes] = []
    size = 0
    # a block ends after its run of blank lines, so the next one starts with its first line
    for block in re.split(rb"(?<=\n\n)(?=[^\n])", data):
        for piece in _cut_long(block, limit, prose) if block else ():
            top = not prose and piece[:1] not in _CLOSERS
            if cur and (size >= target or size + len(piece) > limit
                        or (top and size >= target // 2)):
                out.append(b"".join(cur))
                cur, size = [], 0
            cur.append(piece)
            size += len(piece)
    if cur:
        out.append(b"".join(cur))
    return out


def piece_documents(data: bytes, prefix: str, domain: str, origin: str,
                    prose: bool = True, group: str = "") -> list[Document]:
    """One text (a novel, a play, a source file) as documents `prefix/00000`, ...; `group`:
    their common group (an evaluation set's whole file), none by default."""
    return [Document(f"{prefix}/{i:05d}", b, domain, origin, group)
            for i, b in enumerate(split_blocks(data, prose=prose))]


# ----------------------------------------------------------------------------- split, budget


def _unit_hash(key: str) -> float:
    """A deterministic number in [0, 1) for a string (sha1: stable across runs and machines)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def _units(docs: Iterable[Document]) -> dict[str, list[Document]]:
    """Documents by unit (group or document), each unit's documents in the caller's order."""
    units: dict[str, list[Document]] = {}
    for d in docs:
        units.setdefault(d.unit, []).append(d)
    return units


def join_units(docs: Iterable[Document]) -> list[bytes]:
    """The bytes of each unit (a group's documents joined in their order, else one document), in
    the order units first appear: the documents `moe eval` scores whole (moe.eval.rolling)."""
    return [b"".join(d.data for d in ds) for ds in _units(docs).values()]


def is_heldout(doc: Document, fraction: float) -> bool:
    return _unit_hash(f"{doc.domain}/{doc.unit}") < fraction


def _both_sides(keys: list[str], held: set[str], dom: str) -> None:
    """Move the unit nearest the threshold when `keys` (two or more) are all on one side."""
    inside = [k for k in keys if k in held]
    if len(keys) >= 2 and len(inside) in (0, len(keys)):
        keyed = sorted(keys, key=lambda k: (_unit_hash(f"{dom}/{k}"), k))
        if inside:
            held.discard(keyed[-1])
        else:
            held.add(keyed[0])


def heldout_split(docs: list[Document], fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, held-out) by a hash of each unit (group, else document id): deterministic, disjoint,
    the documents of one group always on the same side.

    When the hash leaves one side empty, the unit nearest the threshold moves over: within each
    source (origin) of two or more units, so every source is measured as well as trained on (a
    16 kb mitochondrion has only four regions), and over the whole corpus whenever it has two.
    """
    units = _units(docs)
    dom = docs[0].domain if docs else "?"
    if len(units) < 2:
        what = "genome region" if docs and docs[0].group else "document"
        raise ConfigError(
            f"data: domain {dom!r} has {len(units)} {what}(s); the held-out split needs at "
            "least 2 (add data or raise data.bytes_per_domain)"
        )
    held = {k for k in units if _unit_hash(f"{dom}/{k}") < fraction}
    by_source: dict[str, list[str]] = {}
    for k, ds in units.items():
        by_source.setdefault(ds[0].origin, []).append(k)
    for keys in by_source.values():
        _both_sides(keys, held, dom)
    _both_sides(list(units), held, dom)
    # keep the caller's order inside each side
    train = [d for d in docs if d.unit not in held]
    return train, [d for d in docs if d.unit in held]


def _shares(sizes: dict[str, int], target: int) -> dict[str, int]:
    """`target` bytes split over sources proportionally to their sizes (largest remainder, ties
    by name), each share at most the source's size."""
    total = sum(sizes.values())
    if target >= total:
        return dict(sizes)
    exact = {s: target * n / total for s, n in sizes.items()}
    share = {s: int(x) for s, x in exact.items()}
    left = target - sum(share.values())
    for s in sorted(exact, key=lambda s: (share[s] - exact[s], s))[:left]:
        share[s] += 1
    return share


def balance(docs: Iterable[Document], budget: int, domain: str) -> list[Document]:
    """`budget` bytes of the documents: each source (origin) its proportional share, filled with
    its units in a fixed hash order, the last document cut so the total is exactly the budget
    (when the corpus is large enough); the result in hash order of units.

    The order is a hash of the unit key, not a shuffle seeded by the run's seed: every run and
    every model then sees the same corpus and the same held-out documents, which keeps
    evaluations comparable.
    """
    units = _units(d for d in docs if d.data)
    if not units:
        raise ConfigError(f"data: domain {domain!r} has an empty corpus (no documents with bytes)")

    def order(k: str) -> tuple[float, str]:
        return _unit_hash(f"order/{domain}/{k}"), k

    by_source: dict[str, list[str]] = {}
    for k in sorted(units, key=order):
        by_source.setdefault(units[k][0].origin, []).append(k)
    sizes = {s: sum(len(d.data) for k in ks for d in units[k]) for s, ks in by_source.items()}
    kept: dict[str, list[Document]] = {}
    for source, share in _shares(sizes, budget).items():
        for k in by_source[source]:
            if share <= 0:
                break
            for d in units[k]:
                if share <= 0:
                    break
                take = d if len(d.data) <= share else replace(d, data=d.data[:share])
                kept.setdefault(k, []).append(take)
                share -= len(take.data)
    return [d for k in sorted(kept, key=order) for d in kept[k]]


def select(docs: list[Document], budget: int, fraction: float, domain: str,
           heldout_filter: Callable[[list[Document], list[Document]], list[Document]]
           | None = None) -> tuple[list[Document], list[Document]]:  # fmt: skip
    """(train, held-out) of a domain's corpus under its byte budget (the module docstring).
    `heldout_filter(train, held)`: the held-out documents to keep, given the budgeted training
    set and the whole held-out side of the split (moe.data.dedup.drop_duplicates); it may only
    remove documents, and the training set does not depend on what it removes."""
    train_all, held_all = heldout_split(docs, fraction)
    avail_train = sum(len(d.data) for d in train_all)
    avail_held = sum(len(d.data) for d in held_all)
    take = min(budget, avail_train + avail_held)
    held_bytes = min(avail_held, round(take * fraction))
    train_bytes = min(avail_train, take - held_bytes)
    held_bytes = min(avail_held, take - train_bytes)  # training ran out: held-out takes the rest
    train = balance(train_all, train_bytes, domain) if train_bytes else []
    if heldout_filter is not None and train:
        held_all = heldout_filter(train, held_all)
        if not held_all:
            raise ConfigError(f"data: domain {domain!r}: every held-out document duplicates "
                              "training (data.dedup dropped them all)")
    held = balance(held_all, held_bytes, domain) if held_bytes else []
    if not train or not held:
        raise ConfigError(
            f"data: domain {domain!r}: data.bytes_per_domain={budget} leaves no "
            f"{'training' if not train else 'held-out'} bytes (raise it)"
        )
    return train, held
