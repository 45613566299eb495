from dataclasses import replace

import pytest
import torch

from moe.config import ConfigError, DataConfig, SourceConfig
from moe.data.datamodule import DomainDataModule
from moe.data.streams import domain_names
from moe.data.tokenizer import IGNORE_INDEX, ByteTokenizer

SMALL = DataConfig(bytes_per_domain=60_000, seq_len=64, batch_size=4)
DNA_TOKENS = set(b"ACGTNRYKMSWBDHV") | {ByteTokenizer.BOS, ByteTokenizer.EOS, ByteTokenizer.PAD}


def dm_for(**kw) -> DomainDataModule:
    seed = kw.pop("seed", 0)
    start = kw.pop("start_step", 0)
    dm = DomainDataModule(replace(SMALL, **kw), seed=seed, start_step=start)
    dm.setup()
    return dm


def batches(dm, n, start_step=None):
    tb = dm.train_batches(start_step)
    return [tb.batch(i) for i in range(tb.start_step, tb.start_step + n)]


def test_domain_names_global_and_stable():
    cfg = DataConfig(sources={"zeta": SourceConfig(kind="files", paths=["x"]),
                              "alpha": SourceConfig(kind="files", paths=["y"])})
    assert domain_names(cfg) == ["text", "code", "dna", "alpha", "zeta"]
    assert domain_names(DataConfig(domains=["dna"])) == ["text", "code", "dna"]


def test_batch_format_and_shift():
    dm = dm_for()
    b = batches(dm, 1)[0]
    assert set(b) == {"input_ids", "targets", "domain", "target_bytes"}
    assert b["input_ids"].shape == b["targets"].shape == (4, 64)
    assert b["domain"].shape == b["target_bytes"].shape == (4,)
    assert all(t.dtype == torch.long for t in b.values())
    # targets are the inputs shifted by one within the packed stream
    seqs = dm.sequences("text", "train")
    x, y = seqs.get(3)
    assert torch.equal(x[1:], y[:-1])
    real = ((b["targets"] < 256) & (b["targets"] >= 0)).sum(-1)
    assert torch.equal(b["target_bytes"], real)


def test_packing_keeps_domains_apart():
    dm = dm_for(stream="mixed")
    names = dm.domain_names
    for b in batches(dm, 20):
        for row, d in zip(b["input_ids"], b["domain"].tolist()):
            toks = set(row.tolist())
            if names[d] == "dna":
                assert toks <= DNA_TOKENS
            else:
                # text and code are never pure DNA letters for 64 bytes
                assert not toks <= DNA_TOKENS


def test_packed_stream_is_bos_doc_eos():
    dm = dm_for(domains=["dna"], stream="separate")
    t = dm.tokens("dna").train
    assert t[0] == ByteTokenizer.BOS
    eos = (t == ByteTokenizer.EOS).nonzero()[0]
    assert len(eos) == dm.describe()[0]["train_documents"]
    assert all(t[i + 1] == ByteTokenizer.BOS for i in eos[:-1])


def test_separate_yields_only_its_domain():
    dm = dm_for(domains=["code"], stream="separate")
    for b in batches(dm, 10):
        assert set(b["domain"].tolist()) == {1}


def test_separate_needs_one_domain():
    with pytest.raises(ConfigError, match="exactly one domain"):
        DomainDataModule(replace(SMALL, stream="separate"))


def test_per_domain_groups_domains():
    dm = dm_for(stream="per_domain", domains=["dna", "text"])
    for b in batches(dm, 5):
        assert b["input_ids"].shape[0] == 8
        assert b["domain"].tolist() == [2] * 4 + [0] * 4
        assert set(b["input_ids"][:4].flatten().tolist()) <= DNA_TOKENS


def test_mixed_respects_weights():
    dm = dm_for(weights={"text": 6.0, "code": 3.0, "dna": 1.0}, batch_size=50)
    counts = torch.bincount(torch.cat([b["domain"] for b in batches(dm, 40)]), minlength=3)
    share = counts.double() / counts.sum()
    assert abs(share[0] - 0.6) < 0.05 and abs(share[1] - 0.3) < 0.05
    assert abs(share[2] - 0.1) < 0.05


def test_mixed_missing_weight_means_zero():
    dm = dm_for(weights={"text": 1.0})
    assert {d for b in batches(dm, 10) for d in b["domain"].tolist()} == {0}


def test_resume_reproduces_batches():
    full = batches(dm_for(seed=7), 30)
    resumed = dm_for(seed=7, start_step=17)
    it = iter(resumed.train_dataloader())
    for i in range(17, 30):
        got = next(it)
        for k in full[i]:
            assert torch.equal(got[k], full[i][k]), (i, k)


def test_seed_changes_order_not_corpus():
    a, b = dm_for(seed=1), dm_for(seed=2)
    assert not torch.equal(batches(a, 1)[0]["input_ids"], batches(b, 1)[0]["input_ids"])
    assert a.describe() == b.describe()


def test_epochs_cover_every_sequence_once():
    dm = dm_for(domains=["dna"], stream="separate", bytes_per_domain=20_000, batch_size=1)
    n = len(dm.sequences("dna", "train"))
    seen = [tuple(b["input_ids"][0].tolist()) for b in batches(dm, n)]
    assert len(set(seen)) == n


def test_workers_keep_batch_order():
    dm = dm_for(num_workers=2)
    ref = batches(dm, 6)
    it = iter(dm.train_dataloader())
    for i in range(6):
        assert torch.equal(next(it)["input_ids"], ref[i]["input_ids"])


def test_heldout_padding_counts_every_byte():
    dm = dm_for()
    for d in ("text", "code", "dna"):
        row = next(r for r in dm.describe() if r["domain"] == d)
        loader = dm.heldout_loader(d, batch_size=16, max_batches=0)
        nbytes, tail = 0, None
        for b in loader:
            assert set(b["domain"].tolist()) == {dm.domain_id(d)}
            nbytes += int(b["target_bytes"].sum())
            tail = b
        assert nbytes == row["heldout_bytes"]
        assert (tail["targets"] == IGNORE_INDEX).any() or row["heldout_bytes"] % 64 == 0
