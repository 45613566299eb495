import hashlib

import pytest

from moe.config import ConfigError
from moe.data.documents import (
    Document,
    balance,
    fasta_documents,
    heldout_split,
    parse_fasta,
    select,
    split_blocks,
)
from moe.data.shipped import SAMPLES, SHA256


def test_samples_are_the_shipped_files():
    shipped = {p.relative_to(SAMPLES).as_posix() for p in SAMPLES.rglob("*") if p.is_file()}
    assert shipped == set(SHA256) | {"README.md"}
    readme = (SAMPLES / "README.md").read_text()
    for rel, digest in SHA256.items():
        assert hashlib.sha256((SAMPLES / rel).read_bytes()).hexdigest() == digest, rel
        assert digest in readme and rel in readme, f"{rel}: not in samples/README.md"


def test_fasta_headers_wrapping_softmask_and_n():
    raw = (b">chr1 some description\nACGTac\ngtNN\r\n\n>chr2\nRYKM\n; comment\nnnAC\n"
           b">empty\n")
    recs = parse_fasta(raw)
    assert recs == [("chr1", b"ACGTACGTNN"), ("chr2", b"RYKMNNAC")]


def test_fasta_sequence_before_header_is_an_error():
    with pytest.raises(ConfigError, match="not FASTA"):
        parse_fasta(b"ACGT\n>x\nAC\n", where="bad.fa")


def test_fasta_windows_and_regions():
    docs = fasta_documents(b">r\n" + b"ACGT" * 700 + b"\n", "g", "dna", "test", window=1024,
                           region=2048)
    assert [len(d.data) for d in docs] == [1024, 1024, 752]
    assert [d.doc_id for d in docs] == ["g/r/0", "g/r/1024", "g/r/2048"]
    assert [d.group for d in docs] == ["g/r@0", "g/r@0", "g/r@2048"]


def test_split_blocks_concatenates_back_within_bounds():
    data = b"A: hi\nthere\n\nB: yes\n\n" * 300
    blocks = split_blocks(data, target=200, limit=400)
    assert b"".join(blocks) == data
    assert all(200 <= len(b) <= 400 for b in blocks[:-1])


def test_split_blocks_cuts_long_prose_at_sentence_ends():
    para = b"It is a truth universally acknowledged. That a single man wants a wife! " * 40
    pieces = split_blocks(para + b"\n\n" + para, target=128, limit=512)
    assert b"".join(pieces) == para + b"\n\n" + para
    assert all(len(p) <= 512 for p in pieces)
    assert all(p.rstrip().endswith((b".", b"!")) for p in pieces)


def test_split_blocks_code_prefers_top_level_starts():
    fn = b"def f%d(x):\n    y = x + 1\n\n    return y * 2\n\n\n"
    src = b"".join(fn % i for i in range(60))
    pieces = split_blocks(src, target=128, limit=512, prose=False)
    assert b"".join(pieces) == src
    assert all(p.startswith(b"def f") for p in pieces)
    # one line longer than the limit is cut hard, nothing is lost
    long = b"x = '" + b"a" * 2000 + b"'\n"
    assert b"".join(split_blocks(long, prose=False)) == long


def _docs(n, size=100, domain="t", origin="test"):
    return [Document(f"d{i}", bytes([65 + i % 26]) * size, domain, origin) for i in range(n)]


def test_balance_respects_budget_and_is_deterministic():
    docs = _docs(50)
    out = balance(docs, 1234, "t")
    assert sum(len(d.data) for d in out) == 1234
    assert [d.doc_id for d in out] == [d.doc_id for d in balance(list(reversed(docs)), 1234, "t")]
    # a budget above the corpus takes everything
    assert sum(len(d.data) for d in balance(docs, 10**6, "t")) == 5000


def test_balance_shares_budget_between_sources_by_size():
    big = _docs(300, origin="big")  # 30,000 bytes
    small = [Document(f"s{i}", b"s" * 100, "t", "small") for i in range(100)]  # 10,000 bytes
    out = balance(big + small, 4000, "t")
    by = {o: sum(len(d.data) for d in out if d.origin == o) for o in ("big", "small")}
    assert by == {"big": 3000, "small": 1000}
    # the sources are interleaved (hash order of documents), not one after the other
    first = [d.origin for d in out[:20]]
    assert "big" in first and "small" in first
    # a larger budget only adds documents
    more = {d.doc_id for d in balance(big + small, 8000, "t")}
    assert {d.doc_id for d in out} <= more


def test_balance_empty_corpus_names_domain():
    with pytest.raises(ConfigError, match="'t' has an empty corpus"):
        balance([Document("x", b"", "t", "o")], 100, "t")


def test_heldout_split_disjoint_deterministic():
    docs = _docs(200)
    train, held = heldout_split(docs, 0.1)
    assert not {d.doc_id for d in train} & {d.doc_id for d in held}
    assert len(train) + len(held) == 200
    assert 5 <= len(held) <= 40
    train2, held2 = heldout_split(list(reversed(docs)), 0.1)
    assert {d.doc_id for d in held} == {d.doc_id for d in held2}
    # a document's side does not depend on which other documents are present
    _, held3 = heldout_split(docs[:100], 0.1)
    assert {d.doc_id for d in held3} == {d.doc_id for d in held if int(d.doc_id[1:]) < 100}


def test_heldout_split_keeps_both_sides_nonempty():
    for n in (2, 3):
        train, held = heldout_split(_docs(n), 0.01)
        assert train and held
        train, held = heldout_split(_docs(n), 0.99)
        assert train and held
    with pytest.raises(ConfigError, match="at least 2"):
        heldout_split(_docs(1), 0.1)


def test_heldout_split_every_source_on_both_sides():
    docs = _docs(300, origin="big") + [Document(f"s{i}", b"s", "t", "small") for i in range(3)]
    train, held = heldout_split(docs, 0.01)
    assert {d.origin for d in train} == {d.origin for d in held} == {"big", "small"}


def test_heldout_split_keeps_groups_together():
    docs = [Document(f"w{i}", b"A" * 10, "t", "g", group=f"r{i // 4}") for i in range(400)]
    train, held = heldout_split(docs, 0.1)
    assert held and train
    assert not {d.group for d in train} & {d.group for d in held}


def test_select_takes_the_fraction_of_the_budget_for_heldout():
    docs = _docs(2000)
    train, held = select(docs, 50_000, 0.1, "t")
    assert sum(len(d.data) for d in held) == 5_000
    assert sum(len(d.data) for d in train) == 45_000
    # the held-out set of a small budget is inside that of a larger one
    _, held_more = select(docs, 120_000, 0.1, "t")
    assert {d.doc_id for d in held} <= {d.doc_id for d in held_more}
    # a budget above the corpus takes all of it, split by hash
    train, held = select(docs, 10**7, 0.1, "t")
    assert len(train) + len(held) == 2000
