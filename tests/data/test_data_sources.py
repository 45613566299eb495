import bz2
import gzip
import json
import sys
from dataclasses import replace

import pytest
import torch

from moe.config import ConfigError, DataConfig, SourceConfig
from moe.data.corpus import load_documents
from moe.data.datamodule import DomainDataModule

SHAKES = "The quality of mercy is not strain'd;\nIt droppeth as the gentle rain from heaven.\n\n"


def files_cfg(paths, domain="mine", **kw) -> DataConfig:
    src = SourceConfig(kind="files", paths=[str(p) for p in paths], **kw)
    return DataConfig(domains=[domain], sources={domain: src}, bytes_per_domain=50_000,
                      seq_len=32, batch_size=2, stream="separate")


def test_jsonl_source_new_domain(tmp_path):
    p = tmp_path / "rows.jsonl"
    rows = [{"body": f"row {i}: " + SHAKES, "n": i} for i in range(40)]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    dm = DomainDataModule(files_cfg([p], text_field="body"), seed=0)
    dm.setup()
    assert dm.domain_names == ["text", "code", "dna", "mine"]
    row = dm.describe()[0]
    assert row["documents"] == 40 and row["source"] == "files"
    assert row["train_documents"] >= 1 and row["heldout_documents"] >= 1
    b = dm.train_batches().batch(0)
    assert b["domain"].tolist() == [3, 3]
    corpus = b"".join(json.dumps(r["body"]).encode()[1:-1] for r in rows)
    piece = dm.tokenizer.decode(b["input_ids"][0])
    assert piece[:8] in corpus or piece[-8:] in corpus


def test_jsonl_missing_column(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ConfigError, match="column 'text' not in"):
        DomainDataModule(files_cfg([p])).setup()


def test_parquet_source(tmp_path):
    import datasets

    p = tmp_path / "t.parquet"
    datasets.Dataset.from_dict({"text": [f"doc {i} " + SHAKES for i in range(10)]}).to_parquet(p)
    docs = load_documents("mine", SourceConfig(kind="files", paths=[str(p)]), 10_000)
    assert len(docs) == 10 and docs[3].data.startswith(b"doc 3 ")


def test_txt_source_keeps_invalid_utf8(tmp_path):
    p = tmp_path / "notes.txt"
    data = (SHAKES.encode() + b"latin-1 caf\xe9\n\n") * 60
    p.write_bytes(data)
    docs = load_documents("mine", SourceConfig(kind="files", paths=[str(p)]), 10**6)
    assert b"".join(d.data for d in docs) == data and len(docs) > 2


def test_fasta_source_and_glob(tmp_path):
    (tmp_path / "a.fa").write_text(">a1\n" + "acgtN" * 500 + "\n")
    (tmp_path / "b.fasta").write_text(">b1 desc\n" + "GGCCA\n" * 300)
    cfg = files_cfg([tmp_path / "*.fa*"], domain="dna")
    dm = DomainDataModule(cfg, seed=0)
    row = dm.describe()[0]
    assert row["bytes"] == 2500 + 1500 and row["domain_id"] == 2
    b = dm.train_batches().batch(0)
    assert set(b["input_ids"].flatten().tolist()) <= set(b"ACGTN") | {256, 257}


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no file matches"):
        DomainDataModule(files_cfg([tmp_path / "nope.jsonl"])).setup()


def test_unsupported_file_type(tmp_path):
    p = tmp_path / "x.docx"
    p.write_bytes(b"x")
    with pytest.raises(ConfigError, match="unsupported file type"):
        DomainDataModule(files_cfg([p])).setup()


def test_empty_corpus(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_bytes(b"")
    with pytest.raises(ConfigError, match="'mine' has an empty corpus"):
        DomainDataModule(files_cfg([p])).setup()


def test_single_document_cannot_be_split(tmp_path):
    p = tmp_path / "one.jsonl"
    p.write_text(json.dumps({"text": "only one"}) + "\n")
    with pytest.raises(ConfigError, match="held-out split needs at least 2"):
        DomainDataModule(files_cfg([p])).setup()


def test_unknown_domain():
    with pytest.raises(ConfigError, match="unknown domain 'poetry'"):
        DomainDataModule(DataConfig(domains=["poetry"]))
    with pytest.raises(ConfigError, match="unknown domain 'poetry'"):
        DomainDataModule(DataConfig()).heldout_loader("poetry")


def test_builtin_kind_for_new_domain():
    cfg = DataConfig(domains=["legal"], sources={"legal": SourceConfig()})
    with pytest.raises(ConfigError, match="no built-in corpus for domain 'legal'"):
        DomainDataModule(cfg).setup()


def test_hf_failure_is_one_line(monkeypatch):
    import datasets

    def boom(*a, **k):
        raise ConnectionError("no network\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    src = SourceConfig(kind="hf", name="someone/corpus")
    with pytest.raises(ConfigError) as e:
        load_documents("hfdom", src, 1000)
    assert "someone/corpus" in str(e.value) and "\n" not in str(e.value)


def test_cache_dir_roundtrip(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"{i} " + SHAKES}) for i in range(30)))
    cfg = replace(files_cfg([p]), cache_dir=str(tmp_path / "cache"))
    a = DomainDataModule(cfg, seed=0)
    a.setup()
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temporary left behind
    from moe.data import datamodule

    datamodule._MEMORY.clear()
    b = DomainDataModule(cfg, seed=0)
    b.setup()
    assert a.describe() == b.describe()
    x_a, x_b = a.train_batches().batch(3)["input_ids"], b.train_batches().batch(3)["input_ids"]
    assert torch.equal(x_a, x_b)
    # a changed file is a new cache entry, never a stale hit
    p.write_text("\n".join(json.dumps({"text": f"{i} changed " + SHAKES}) for i in range(30)))
    DomainDataModule(cfg, seed=0).setup()
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_default_describe_and_val_loaders():
    dm = DomainDataModule(DataConfig(), seed=0)
    rows = dm.describe()
    assert [r["domain"] for r in rows] == ["text", "code", "dna"]
    for r in rows:
        assert r["bytes"] <= 400_000
        assert r["train_documents"] + r["heldout_documents"] == r["documents"]
        assert r["train_bytes"] + r["heldout_bytes"] == r["bytes"]
        assert r["heldout_sequences"] > 0 and r["train_sequences"] > 0
    assert rows[0]["bytes"] == rows[1]["bytes"] == rows[2]["bytes"] == 400_000
    assert "Austen" in rows[0]["origin"] and "tinyshakespeare" in rows[0]["origin"]
    assert "CPython 3.11.7" in rows[1]["origin"] and "Go 1.19" in rows[1]["origin"]
    assert all(r["heldout_documents"] >= 100 for r in rows)
    loaders = dm.val_dataloader()
    assert len(loaders) == 3
    assert [next(iter(v))["domain"][0].item() for v in loaders] == [0, 1, 2]


# ---------------------------------------------------------------------------- gzip, bad files


def test_gz_text_is_decompressed(tmp_path):
    data = (SHAKES * 200).encode()
    (tmp_path / "plays.txt.gz").write_bytes(gzip.compress(data))
    (tmp_path / "plain.txt").write_bytes(data)
    gz = load_documents("mine", SourceConfig(kind="files", paths=[str(tmp_path / "*.gz")]), 0)
    plain = load_documents("mine", SourceConfig(kind="files", paths=[str(tmp_path / "p*.txt")]), 0)
    assert b"".join(d.data for d in gz) == data
    assert [d.data for d in gz] == [d.data for d in plain]
    # a gzipped file that lost its .gz suffix is recognised by its first bytes
    (tmp_path / "renamed.txt").write_bytes(gzip.compress(data))
    docs = load_documents("mine", SourceConfig(kind="files", paths=[str(tmp_path / "re*")]), 0)
    assert b"".join(d.data for d in docs) == data


def test_gz_fasta_is_decompressed(tmp_path):
    (tmp_path / "g.fa.gz").write_bytes(gzip.compress(b">g1\n" + b"ACGT" * 2000 + b"\n"))
    docs = load_documents("dna", SourceConfig(kind="files", paths=[str(tmp_path / "g.fa.gz")]), 0)
    assert b"".join(d.data for d in docs) == b"ACGT" * 2000


@pytest.mark.parametrize("name", ["rows.jsonl.gz", "rows.json.gz", "rows.csv.gz",
                                  "rows.parquet.gz", "rows.parquet"])
def test_gz_tables_are_decompressed(tmp_path, name):
    import datasets

    texts = [f"doc {i}: " + SHAKES for i in range(12)]
    ds = datasets.Dataset.from_dict({"text": texts, "n": list(range(12))})
    plain = tmp_path / name.removesuffix(".gz")
    if ".jsonl" in name or ".json" in name:
        ds.to_json(plain, lines=True)
    elif ".csv" in name:
        ds.to_csv(plain, index=False)
    else:
        ds.to_parquet(plain)
    path = plain
    if name.endswith(".gz"):
        path = tmp_path / name
        path.write_bytes(gzip.compress(plain.read_bytes()))
        plain.unlink()
    docs = load_documents("mine", SourceConfig(kind="files", paths=[str(path)]), 0)
    assert [d.data.decode() for d in docs] == texts


def test_gz_arrow_is_decompressed(tmp_path):
    import pyarrow as pa

    table = pa.table({"text": ["first " + SHAKES, "second " + SHAKES]})
    for writer in (pa.ipc.new_stream, pa.ipc.new_file):
        sink = pa.BufferOutputStream()
        with writer(sink, table.schema) as w:
            w.write_table(table)
        p = tmp_path / f"t-{writer.__name__}.arrow.gz"
        p.write_bytes(gzip.compress(sink.getvalue().to_pybytes()))
        docs = load_documents("mine", SourceConfig(kind="files", paths=[str(p)]), 0)
        assert [d.data[:6] for d in docs] == [b"first ", b"second"]


def _refused(path, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_documents("mine", SourceConfig(kind="files", paths=[str(path)]), 0)
    assert "\n" not in str(e.value) and path.name in str(e.value)


def test_binary_text_is_refused(tmp_path):
    g = torch.Generator().manual_seed(0)
    noise = bytes(torch.randint(256, (20_000,), generator=g).tolist())
    (tmp_path / "noise.txt").write_bytes(noise)
    _refused(tmp_path / "noise.txt", "binary data, not text")
    (tmp_path / "noise.txt.gz").write_bytes(gzip.compress(noise))
    _refused(tmp_path / "noise.txt.gz", "binary data, not text")
    (tmp_path / "utf16.txt").write_bytes((SHAKES * 20).encode("utf-16"))
    _refused(tmp_path / "utf16.txt", "NUL or control bytes")
    (tmp_path / "seq.fa").write_bytes(b">x\n" + noise)
    _refused(tmp_path / "seq.fa", "binary data")
    # a bzip2 file renamed .txt is named as such
    (tmp_path / "packed.txt").write_bytes(bz2.compress((SHAKES * 50).encode()))
    _refused(tmp_path / "packed.txt", "bzip2 data")


def test_text_with_form_feeds_and_escapes_is_text(tmp_path):
    p = tmp_path / "log.txt"
    p.write_bytes(("\x1b[1mbold\x1b[0m line\r\n\f" + SHAKES).encode() * 50)
    assert load_documents("mine", SourceConfig(kind="files", paths=[str(p)]), 0)


def test_bad_gzip_is_refused(tmp_path):
    (tmp_path / "plain.txt.gz").write_bytes((SHAKES * 10).encode())
    _refused(tmp_path / "plain.txt.gz", "named .gz but not gzip data")
    (tmp_path / "rows.jsonl.gz").write_bytes(b'{"text": "x"}\n')
    _refused(tmp_path / "rows.jsonl.gz", "named .gz but not gzip data")
    whole = gzip.compress((SHAKES * 400).encode())
    (tmp_path / "cut.txt.gz").write_bytes(whole[: len(whole) // 2])
    _refused(tmp_path / "cut.txt.gz", r"unreadable gzip data \(cut short\)")


@pytest.mark.parametrize("name,match", [
    ("corpus.txt.bz2", "bzip2 files are not read"), ("corpus.tar.gz", "tar archives are not read"),
    ("corpus.zip", "zip archives are not read"), ("corpus.xz", "xz files are not read"),
    ("notes.docx", "unsupported file type"), ("notes.pdf.gz", "unsupported file type"),
])
def test_unreadable_formats_are_refused(tmp_path, name, match):
    (tmp_path / name).write_bytes(b"whatever")
    _refused(tmp_path / name, match)


def test_builtin_cache_key_follows_the_samples(monkeypatch):
    from moe.data import datamodule, shipped
    from moe.data.tokenizer import ByteTokenizer

    cfg, tok = DataConfig(), ByteTokenizer()
    key = datamodule._cache_key("code", SourceConfig(), cfg, tok)
    monkeypatch.setattr(sys, "version", "3.99.0 (another interpreter)")
    assert datamodule._cache_key("code", SourceConfig(), cfg, tok) == key
    monkeypatch.setattr(datamodule, "samples_digest", lambda: "0" * 64)
    assert datamodule._cache_key("code", SourceConfig(), cfg, tok) != key
    assert len(shipped.samples_digest()) == 64
