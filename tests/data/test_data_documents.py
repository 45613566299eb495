import hashlib
from pathlib import Path

import pytest

from moe.config import ConfigError
from moe.data.documents import (
    Document,
    balance,
    fasta_documents,
    heldout_split,
    parse_fasta,
    split_blocks,
)
from moe.data.source_code import code_documents
from moe.data.source_dna import DNA_DIR, dna_documents
from moe.data.source_text import SAMPLES, text_documents

SHA256 = {
    "text/tinyshakespeare.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    "dna/arabidopsis_chloroplast.fa": (
        "2bcb6eec38c296e92ab396b9cfc58db4f09860348bd9287f92149d714cce2683"
    ),
    "dna/human_mito.fa": "61d555747e94900b594911f556356f5a2b719fe193d44ea13138f7fe017bc63b",
    "dna/lambda_phage.fa": "0a04f81952deb68c204e8ae67e0573cb97d348f18ab1b527630d57c294028cf5",
    "dna/orangutan_mito.fa": "a3c28ab80821b706873f9a0b6983f9c949dd6bf56dd61a9b3e0347aa2a58fe57",
}


def test_samples_are_the_shipped_files():
    for rel, digest in SHA256.items():
        assert hashlib.sha256((SAMPLES / rel).read_bytes()).hexdigest() == digest, rel


def test_fasta_headers_wrapping_softmask_and_n():
    raw = (b">chr1 some description\nACGTac\ngtNN\r\n\n>chr2\nRYKM\n; comment\nnnAC\n"
           b">empty\n")
    recs = parse_fasta(raw)
    assert recs == [("chr1", b"ACGTACGTNN"), ("chr2", b"RYKMNNAC")]


def test_fasta_sequence_before_header_is_an_error():
    with pytest.raises(ConfigError, match="not FASTA"):
        parse_fasta(b"ACGT\n>x\nAC\n", where="bad.fa")


def test_fasta_windows():
    docs = fasta_documents(b">r\n" + b"ACGT" * 700 + b"\n", "g", "dna", "test", window=1024)
    assert [len(d.data) for d in docs] == [1024, 1024, 752]
    assert [d.doc_id for d in docs] == ["g/r/0", "g/r/1024", "g/r/2048"]


def test_shipped_genomes_parse_to_bases():
    docs = dna_documents()
    total = sum(len(d.data) for d in docs)
    assert total == 154_478 + 16_569 + 48_502 + 16_499
    assert set(b"".join(d.data for d in docs)) <= set(b"ACGTNRYKMSWBDHV")
    # the one soft-masked base of the human mitochondrion is upper-cased
    raw = (DNA_DIR / "human_mito.fa").read_bytes()
    assert b"a" in raw.split(b"\n", 1)[1]


def test_split_blocks_concatenates_back():
    data = b"A: hi\nthere\n\nB: yes\n\n" * 300
    blocks = split_blocks(data, target=200)
    assert b"".join(blocks) == data
    assert all(len(b) >= 200 for b in blocks[:-1])


def test_text_and_code_corpora():
    text = text_documents()
    assert any(d.doc_id.startswith("tinyshakespeare/") for d in text)
    assert any(d.doc_id.startswith("pydoc_topics/") for d in text)
    code = code_documents()
    ids = [d.doc_id for d in code]
    assert ids == sorted(ids) and "os.py" in ids
    assert not any("site-packages" in i or "/test/" in f"/{i}" for i in ids)


def _docs(n, size=100, domain="t"):
    return [Document(f"d{i}", bytes([65 + i % 26]) * size, domain, "test") for i in range(n)]


def test_balance_respects_budget_and_is_deterministic():
    docs = _docs(50)
    out = balance(docs, 1234, "t")
    assert sum(len(d.data) for d in out) == 1234
    assert [d.doc_id for d in out] == [d.doc_id for d in balance(list(reversed(docs)), 1234, "t")]
    # a budget above the corpus takes everything
    assert sum(len(d.data) for d in balance(docs, 10**6, "t")) == 5000


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


def test_sample_paths_exist():
    assert Path(SAMPLES, "README.md").is_file()
