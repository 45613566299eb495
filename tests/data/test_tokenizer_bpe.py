"""Hugging Face tokenizers in the data pipeline: loading, specials, the bytes each token covers,
packing with per-token bytes, the cache key and the checkpoint helpers."""

import pytest
from tokenizer_fixtures import bpe_checkpoint, bpe_tokenizer

from moe.config import ConfigError, DataConfig, SourceConfig
from moe.data import datamodule
from moe.data.documents import Document
from moe.data.streams import PackedSequences, pack_with_bytes
from moe.data.tokenizer import (
    BYTE_HASH,
    ByteTokenizer,
    HFTokenizer,
    carried_tokenizer,
    check_vocab,
    checkpoint_tokenizer,
    load_tokenizer,
    tokenizer_hash,
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return bpe_tokenizer(tmp_path_factory.mktemp("tok") / "bpe")


def test_load_and_specials(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 400
    assert tok.bos_id == tok.eos_id == 0 and tok.pad_id == 1
    assert load_tokenizer(tok_dir / "tokenizer.json").sha256 != tok.sha256  # fewer files
    assert tok.name.startswith("hf:") and tok.identity()["sha256"] == tok.sha256
    text = "The cat sat, naïvely. 😀"
    assert tok.decode(tok.encode(text)) == text.encode()
    assert tok.decode([tok.bos_id] + tok.encode("ab") + [tok.eos_id]) == b"ab"


def test_a_tokenizer_without_separators_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match="no BOS or EOS"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("data", [
    b"plain ascii text, two spaces  and a tab\tend ",
    "naïve café — 😀 文字".encode(),
    b"latin-1 \xe9t\xe9, cut utf-8 \xc3 and \xff\xfe bytes",
    b"",
    b"   ",
])  # fmt: skip
def test_token_bytes_sum_to_the_document(tok_dir, data):
    tok = load_tokenizer(tok_dir)
    ids, nb = tok.encode_with_bytes(data)
    assert len(ids) == len(nb) and (nb >= 0).all()
    assert nb.sum() <= len(data)
    packed, counts = pack_with_bytes([Document("d/0", data, "text", "t")], tok)
    assert counts.sum() == len(data)  # EOS takes what no token covered
    assert packed[0] == tok.bos_id and packed[-1] == tok.eos_id and counts[0] == 0


def test_token_bytes_follow_the_offsets(tok_dir):
    tok = load_tokenizer(tok_dir)
    text = "the cat é"
    ids, nb = tok.encode_with_bytes(text.encode())
    # each token covers its own text; é (2 bytes) may be one or two byte-level tokens
    pieces = [tok.decode([i]) for i in ids]
    if all(p != "\ufffd".encode() for p in pieces):
        assert nb.tolist() == [len(p) for p in pieces]
    assert nb.sum() == len(text.encode())


def test_packed_sequences_carry_the_bytes_of_each_target(tok_dir):
    tok = load_tokenizer(tok_dir)
    docs = [Document(f"d/{i}", f"doc {i}: the cat sat on the mat.".encode(), "text", "t")
            for i in range(5)]
    tokens, counts = pack_with_bytes(docs, tok)
    seqs = PackedSequences(tokens, 8, 0, None, tok.pad_id, pad_tail=True, token_bytes=counts)
    total = sum(int(seqs.item(i)[2].sum()) for i in range(len(seqs)))
    assert total == sum(len(d.data) for d in docs)
    x, y, b = seqs.item(len(seqs) - 1)
    assert (b[y == -100] == 0).all()


def test_byte_tokenizer_path_is_unchanged():
    tok = ByteTokenizer()
    tokens, counts = pack_with_bytes([Document("d/0", b"abc", "text", "t")], tok)
    assert counts is None and tokens.tolist() == [256, 97, 98, 99, 257]
    assert tok.identity() == {"kind": "byte", "sha256": BYTE_HASH, "vocab_size": 259}


def test_cache_key_follows_the_tokenizer_content(tok_dir, tmp_path):
    cfg, src = DataConfig(), SourceConfig()
    a = datamodule._cache_key("text", src, cfg, load_tokenizer(tok_dir))
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in tok_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert datamodule._cache_key("text", src, cfg, load_tokenizer(copy)) == a  # content, not path
    other = bpe_tokenizer(tmp_path / "other", skip=40)
    assert datamodule._cache_key("text", src, cfg, load_tokenizer(other)) != a
    assert datamodule._cache_key("text", src, cfg, ByteTokenizer()) != a


def test_datamodule_packs_with_the_tokenizer(tok_dir):
    cfg = DataConfig(domains=["text"], bytes_per_domain=20_000, seq_len=32, batch_size=2)
    dm = datamodule.DomainDataModule(cfg, seed=0, tokenizer=load_tokenizer(tok_dir))
    t = dm.tokens("text")
    assert t.heldout_nbytes.sum() == t.stats["heldout_bytes"]
    assert t.train_nbytes.sum() == t.stats["train_bytes"]
    b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].max() < 400 and (b["target_bytes"] > 0).all()


def test_checkpoint_tokenizer_rules(tok_dir, tmp_path):
    from generate_fixtures import no_tokenizer_checkpoint, save_tiny

    ck = bpe_checkpoint(tmp_path / "bpe", tok_dir)
    assert (ck / "tokenizer" / "tokenizer.json").is_file()
    assert isinstance(carried_tokenizer(ck, 400), type(ck))  # its tokenizer/ directory
    assert checkpoint_tokenizer(ck, 400).sha256 == load_tokenizer(tok_dir).sha256
    assert checkpoint_tokenizer(ck, 400, str(tok_dir)).vocab_size == 400  # the same one
    with pytest.raises(ConfigError, match="is another one"):
        checkpoint_tokenizer(ck, 400, str(bpe_tokenizer(tmp_path / "other", skip=40)))
    with pytest.raises(ConfigError, match="more than the model's embedding"):
        checkpoint_tokenizer(ck, 300)
    byte = save_tiny(tmp_path / "byte")
    assert tokenizer_hash(byte, 259) == BYTE_HASH
    with pytest.raises(ConfigError, match="is another one"):
        checkpoint_tokenizer(byte, 259, str(tok_dir))
    bare = no_tokenizer_checkpoint(tmp_path / "bare")
    assert tokenizer_hash(bare, 300) is None
    with pytest.raises(ConfigError, match="data.tokenizer=PATH"):
        checkpoint_tokenizer(bare, 300)
    with pytest.raises(ConfigError, match="more than the model's embedding"):
        checkpoint_tokenizer(bare, 300, str(tok_dir))  # 400 tokens > 300 rows
    with pytest.raises(ConfigError, match="more than"):
        check_vocab(ByteTokenizer(), 100, "x")
