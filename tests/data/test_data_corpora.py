"""The built-in corpora: pinned shipped samples, enough held-out documents, genome regions."""

import hashlib
import sys
from collections import defaultdict

import pytest

from moe.config import SourceConfig
from moe.data.corpus import build_corpus
from moe.data.documents import DNA_REGION, DNA_WINDOW, heldout_split
from moe.data.shipped import SAMPLES
from moe.data.source_code import code_documents
from moe.data.source_dna import dna_documents
from moe.data.source_text import austen_novels, text_documents

BUILTIN = SourceConfig()


def _fingerprint(docs) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.doc_id.encode() + b"\0" + d.group.encode() + b"\0")
        h.update(hashlib.sha256(d.data).digest())
    return h.hexdigest()


def test_code_corpus_is_the_pinned_sample():
    docs = code_documents()
    ids = [d.doc_id for d in docs]
    assert len(set(ids)) == len(ids)
    files = {i.rsplit("/", 1)[0] for i in ids}
    assert {f.split("/", 1)[0] for f in files} == {"cpython3.11", "go1.19"}
    assert "cpython3.11/os.py" in files and "go1.19/strings/builder.go" in files
    assert all(f.endswith((".py", ".go")) for f in files)
    assert sum(len(d.data) for d in docs) == 7_096_595 + 3_100_426
    # read from the package, not from the running interpreter's standard library
    assert not any(sys.prefix in d.origin for d in docs)
    assert all("moe/data/samples/code/" in d.origin for d in docs)


def test_builtin_corpora_do_not_depend_on_the_interpreter(monkeypatch):
    """Built again under another Python version and stdlib path, the documents are the same."""
    from moe.data import source_code, source_dna, source_text

    before = [_fingerprint(f()) for f in (text_documents, code_documents, dna_documents)]
    for mod, fn in ((source_text, "_text_documents"), (source_code, "_code_documents"),
                    (source_dna, "_dna_documents")):
        getattr(mod, fn).cache_clear()
    monkeypatch.setattr(sys, "version_info", (3, 99, 0, "final", 0))
    monkeypatch.setattr(sys, "version", "3.99.0")
    monkeypatch.setattr(sys, "prefix", "/nonexistent")
    import sysconfig

    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": "/nonexistent"})
    after = [_fingerprint(f()) for f in (text_documents, code_documents, dna_documents)]
    assert before == after


def test_text_corpus_is_austen_and_shakespeare():
    novels = [n for n, _ in austen_novels()]
    assert novels == ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                      "sensesensibility"]
    docs = text_documents()
    assert {d.doc_id.split("/")[0] for d in docs} == {"austen", "tinyshakespeare"}
    assert not any(b"=== " in d.data for d in docs)  # the separator lines are not text
    assert sum(len(d.data) for d in docs) > 5_000_000
    assert all(len(d.data) <= 512 for d in docs)


def test_dna_corpus_has_all_genomes():
    docs = dna_documents()
    per = defaultdict(int)
    for d in docs:
        per[d.doc_id.split("/")[0]] += len(d.data)
    assert dict(per) == {
        "arabidopsis_chloroplast": 154_478, "helicobacter_pylori_G27": 1_652_982,
        "human_mito": 16_569, "lambda_phage": 48_502, "orangutan_mito": 16_499,
        "staphylococcus_aureus_N315": 2_814_816,
    }
    assert set(b"".join(d.data for d in docs)) <= set(b"ACGTNRYKMSWBDHV")
    # the one soft-masked base of the human mitochondrion is upper-cased
    assert b"a" in (SAMPLES / "dna" / "human_mito.fa").read_bytes().split(b"\n", 1)[1]


@pytest.mark.parametrize("budget", [400_000, 1_000_000, 2_000_000])
@pytest.mark.parametrize("domain", ["text", "code", "dna"])
def test_builtin_heldout_has_100_documents(domain, budget):
    c = build_corpus(domain, BUILTIN, budget, 0.1)
    train_bytes = sum(len(d.data) for d in c.train)
    held_bytes = sum(len(d.data) for d in c.heldout)
    assert train_bytes + held_bytes == budget
    assert held_bytes == budget // 10
    assert len(c.heldout) >= 100
    assert not {d.doc_id for d in c.train} & {d.doc_id for d in c.heldout}
    # every source of the domain is in both splits
    assert {d.origin for d in c.train} == {d.origin for d in c.heldout}


def test_builtin_domains_offer_3mb():
    for docs in (text_documents(), code_documents(), dna_documents()):
        assert sum(len(d.data) for d in docs) > 3_000_000


def _windows(docs):
    """(genome/record, start, end) of each window."""
    out = []
    for d in docs:
        rec, start = d.doc_id.rsplit("/", 1)
        out.append((rec, int(start), int(start) + len(d.data)))
    return out


def test_genome_split_is_by_contiguous_region():
    docs = dna_documents()
    train, held = heldout_split(docs, 0.1)
    assert held and train
    tr, he = _windows(train), _windows(held)
    # no held-out base is in a training window
    by_rec = defaultdict(list)
    for rec, s, e in tr:
        by_rec[rec].append((s, e))
    for rec, s, e in he:
        assert not any(s < e2 and s2 < e for s2, e2 in by_rec[rec]), (rec, s)
    # held-out windows come in whole regions: runs of contiguous windows, each run starting and
    # ending at a region boundary (or the record's end)
    rec_len = {}
    for rec, _, e in tr + he:
        rec_len[rec] = max(rec_len.get(rec, 0), e)
    runs = defaultdict(list)
    for rec, s, e in sorted(he):
        if runs[rec] and runs[rec][-1][1] == s:
            runs[rec][-1][1] = e
        else:
            runs[rec].append([s, e])
    for rec, rs in runs.items():
        for s, e in rs:
            assert s % DNA_REGION == 0
            assert e % DNA_REGION == 0 or e == rec_len[rec]
            assert (e - s) >= min(DNA_REGION, rec_len[rec] - s)
    # a held-out window neighbours training only at a region's ends: at most 2 per region
    starts = {(rec, s) for rec, s, _ in tr}
    touching = sum(((rec, e) in starts) + ((rec, s - DNA_WINDOW) in starts) for rec, s, e in he)
    n_regions = len({d.group for d in held})
    assert touching <= 2 * n_regions < len(held) / 4


def test_genome_regions_within_budget_stay_contiguous():
    c = build_corpus("dna", BUILTIN, 400_000, 0.1)
    groups = defaultdict(list)
    for d in c.heldout:
        groups[d.group].append(int(d.doc_id.rsplit("/", 1)[1]))
    # the kept windows of a region are consecutive and in genome order in the held-out stream
    for starts in groups.values():
        assert starts == list(range(starts[0], starts[0] + DNA_WINDOW * len(starts), DNA_WINDOW))
    assert len(groups) >= 5
