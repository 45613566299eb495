"""`moe retokenize`: bytes of byte-level tokens, mean-of-bytes rows by hand, the coverage check,
the command end to end (tokenizer carried, body frozen while training), bad input."""

from __future__ import annotations

import pytest
import torch
from generate_fixtures import tiny_model, word_tokenizer
from tokenizer_fixtures import bpe_tokenizer

from moe.cli import main
from moe.config import ConfigError
from moe.data.tokenizer import ByteTokenizer, load_tokenizer
from moe.io.checkpoint import load_checkpoint, make_meta, read_meta, save_checkpoint
from moe.surgery.retokenize import check_covers_bytes, retokenize_state, token_bytes

DATA = {"domains": ["text", "code"], "bytes_per_domain": 20000, "seq_len": 32, "batch_size": 4}


@pytest.fixture
def byte_ckpt(tmp_path):
    m = tiny_model(0, tie_embeddings=False)
    meta = make_meta(recipe={"data": DATA, "seed": 5})
    return save_checkpoint(tmp_path / "src", m.state_dict(), m.config, meta,
                           tokenizer=ByteTokenizer())  # fmt: skip


def test_token_bytes_round_trip_through_the_tokenizer(tmp_path):
    """The bytes spelled by the tokens of any text's encoding are that text's bytes, exactly
    (multi-byte UTF-8 split across tokens included)."""
    tok = load_tokenizer(bpe_tokenizer(tmp_path / "bpe", 330))
    spelled = token_bytes(tok)
    assert all((b is None) == (i in tok.special_ids) for i, b in enumerate(spelled))
    assert sum(b is not None and len(b) > 1 for b in spelled) > 40  # merges: several bytes
    for text in ("The quick brown fox, in 1984.\n\tdef f(x): return x", "naïve 中文 😀 é\x00"):
        ids = tok.encode(text)
        assert b"".join(spelled[i] for i in ids) == text.encode("utf-8")


def test_mean_of_bytes_rows_by_hand(tmp_path):
    tok = load_tokenizer(bpe_tokenizer(tmp_path / "bpe", 330))
    m = tiny_model(0, tie_embeddings=False)
    sd = m.state_dict()
    cfg2, sd2 = retokenize_state(m.config, sd, ByteTokenizer(), tok, "mean")
    assert cfg2.vocab_size == tok.vocab_size and sd2["tok_emb.weight"].shape[0] == tok.vocab_size
    spelled = token_bytes(tok)
    i = next(j for j, b in enumerate(spelled) if b is not None and len(b) == 3)
    want = sd["tok_emb.weight"][list(spelled[i])].mean(0)
    assert torch.allclose(sd2["tok_emb.weight"][i], want)
    assert torch.allclose(sd2["lm_head.weight"][i], sd["lm_head.weight"][list(spelled[i])].mean(0))
    assert torch.equal(sd2["tok_emb.weight"][tok.eos_id], sd["tok_emb.weight"][ByteTokenizer.EOS])
    assert torch.equal(sd2["layers.0.attn.wq.weight"], sd["layers.0.attn.wq.weight"])
    _, rnd = retokenize_state(m.config, sd, ByteTokenizer(), tok, "random", seed=1)
    assert not torch.allclose(rnd["tok_emb.weight"][i], want)


def test_a_tokenizer_that_misses_bytes_is_refused(tmp_path):
    tok = load_tokenizer(word_tokenizer(tmp_path / "words"))
    with pytest.raises(ConfigError, match="cannot encode byte 0x00"):
        check_covers_bytes(tok, "here")
    check_covers_bytes(load_tokenizer(bpe_tokenizer(tmp_path / "bpe", 330)), "here")


def test_retokenize_cli_trains_a_bpe_and_carries_it(byte_ckpt, tmp_path):
    out = tmp_path / "rt"
    assert main(["retokenize", str(byte_ckpt), "--out", str(out), "--vocab-size", "300"]) == 0
    ck = load_checkpoint(out)
    meta = read_meta(out)
    assert ck.config.vocab_size == 300 and (out / "tokenizer" / "tokenizer.json").is_file()
    assert meta["tokenizer"]["kind"] == "hf" and meta["parents"] == [read_meta(byte_ckpt)["id"]]
    assert meta["recipe"]["data"]["bytes_per_domain"] == 20000  # moe eval finds the same data
    from moe.eval.evaluate import evaluate_checkpoint

    rep = evaluate_checkpoint(out, ["text"], max_docs=2, batch_size=2, progress=False)
    assert 0 < rep["domains"]["text"]["bpb"] < 20


def test_freeze_body_trains_only_the_embeddings(byte_ckpt, tmp_path):
    out = tmp_path / "rt"
    args = ["--vocab-size", "300", "--steps", "2", "--freeze-body"]
    assert main(["retokenize", str(byte_ckpt), "--out", str(out), *args,
                 "trainer.enable_progress_bar=false"]) == 0  # fmt: skip
    a = load_checkpoint(out / "retok").state_dict
    b = load_checkpoint(out / "model").state_dict
    changed = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert changed == ["lm_head.weight", "tok_emb.weight"]


@pytest.mark.parametrize(
    "args,msg",
    [
        ([], "give one of --vocab-size N"),
        (["--vocab-size", "300", "--tokenizer", "x"], ", not both"),
        (["--vocab-size", "100"], "at least 258"),
        (["--vocab-size", "300", "--init", "zeros"], "choose one of mean, random"),
        (["--vocab-size", "300", "--freeze-body"], "give --steps"),
        (["--tokenizer", "WORDS"], "cannot encode"),
    ],
)
def test_retokenize_bad_input(byte_ckpt, tmp_path, capsys, args, msg):
    if "WORDS" in args:
        args = [str(word_tokenizer(tmp_path / "words")) if a == "WORDS" else a for a in args]
    out = tmp_path / "rt"
    assert main(["retokenize", str(byte_ckpt), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1, err
    assert not out.exists()
