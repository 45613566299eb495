"""The rolling log-likelihood protocol (moe/eval/rolling.py): lm-eval-harness's windows, the
sliding-window variant, brute-force scores, batching, domain-routed MoEs, evaluation sets at
their natural length, and the protocol in `moe eval`'s JSON."""

import json
import math

import numpy as np
import pytest
import torch
from generate_fixtures import save_tiny, tiny_model

from moe.cli import main
from moe.config import ConfigError, DataConfig, SourceConfig
from moe.data.datamodule import DomainDataModule
from moe.data.tokenizer import ByteTokenizer
from moe.eval.evaluate import evaluate_model, format_table
from moe.eval.rolling import check_protocol, score_documents, window_tokens, windows

P = -100  # the prefix token in the window examples (lm-eval's own tests use -100 too)


def lm_eval_pairs(tokens, context):
    """Our windows as lm-eval's disjoint (context, continuation) pairs: the model reads
    (context + continuation)[:-1] and scores the continuation."""
    out = []
    for w in windows(len(tokens), context):
        inp, scored = window_tokens(tokens, P, w)
        assert len(inp) <= context and inp[len(inp) - len(scored) + 1 :] == scored[:-1]
        out.append((inp[: len(inp) - len(scored) + 1], scored))
    return out


# ----------------------------------------------------------------------------- windows


def test_windows_equal_lm_evals_on_hand_examples():
    # lm-eval's own example (tests/test_utils.py, max_seq_len=10, context_len=1), made disjoint
    x = list(range(34))
    assert lm_eval_pairs(x, 10) == [
        ([P], list(range(10))),
        ([9], list(range(10, 20))),
        ([19], list(range(20, 30))),
        ([23, 24, 25, 26, 27, 28, 29], [30, 31, 32, 33]),
    ]
    t = [10, 11, 12, 13, 14]
    assert lm_eval_pairs(t, 3) == [([P], [10, 11, 12]), ([11, 12], [13, 14])]
    assert lm_eval_pairs(t, 4) == [([P], [10, 11, 12, 13]), ([10, 11, 12, 13], [14])]
    assert lm_eval_pairs(t, 5) == [([P], t)]  # fits exactly
    assert lm_eval_pairs(t, 8) == [([P], t)]  # shorter than the context
    assert lm_eval_pairs([7], 4) == [([P], [7])]  # one token
    assert lm_eval_pairs([7], 1) == [([P], [7])]
    assert lm_eval_pairs([1, 2, 3], 1) == [([P], [1]), ([1], [2]), ([2], [3])]
    assert lm_eval_pairs([], 4) == []


def hf_guide(n, context, stride):
    """The Hugging Face perplexity guide's loop over seq = [prefix] + n tokens, windows of
    max_length = context + 1 tokens: [(begin, end, scored target positions)]."""
    seq_len, max_length = n + 1, context + 1
    out, prev_end = [], 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        # labels input_ids[begin:end] with all but the last trg_len masked; the model shifts
        # them, so position begin is never a target
        targets = [j for j in range(max(end - trg_len, begin + 1), end)]
        out.append((begin, end - 1, targets))
        prev_end = end
        if end == seq_len:
            break
    return out


@pytest.mark.parametrize("n,context,stride", [(1, 4, 2), (5, 4, 1), (10, 4, 3), (37, 8, 5),
                                              (64, 8, 7), (8, 8, 4), (9, 8, 4)])  # fmt: skip
def test_stride_windows_equal_the_hf_guides_loop(n, context, stride):
    got = [(w.lo, w.hi, list(range(w.hi + 1 - w.scored, w.hi + 1)))
           for w in windows(n, context, stride)]  # fmt: skip
    assert got == hf_guide(n, context, stride)
    scored = [j for _, _, ts in got for j in ts]
    assert scored == list(range(1, n + 1))  # every token once
    assert all(hi - lo <= context for lo, hi, _ in got)


@pytest.mark.parametrize("n,context", [(1, 3), (7, 3), (9, 3), (100, 16), (16, 16), (17, 16)])
def test_disjoint_windows_score_every_token_once_at_full_context(n, context):
    ws = windows(n, context)
    scored = [j for w in ws for j in range(w.hi + 1 - w.scored, w.hi + 1)]
    assert scored == list(range(1, n + 1))
    assert all(w.hi - w.lo == min(context, n) for w in ws)  # every window as long as it can be


def test_protocol_refusals():
    assert check_protocol(None, None, None, 256) == 256
    assert check_protocol(64, 63, 1, 256) == 64
    with pytest.raises(ConfigError, match="--context 512: must be between 1 and the model's"):
        check_protocol(512, None, None, 256)
    for bad in (0, -3, 64, 65):
        with pytest.raises(ConfigError, match=f"--stride {bad}: must be between 1"):
            check_protocol(64, bad, None, 256)
    with pytest.raises(ConfigError, match="max_docs 0"):
        check_protocol(None, None, 0, 256, cli=False)


# ----------------------------------------------------------------------------- scores


def token_nll(model, seq, lo, j, domain=None):
    """NLL of seq[j] read after seq[lo:j], one forward pass (float64 softmax)."""
    x = torch.tensor([seq[lo:j]])
    hint = None if domain is None else torch.tensor([domain])
    with torch.no_grad():
        logits = model(x, domain=hint).logits[0, -1].double()
    return -float(torch.log_softmax(logits, -1)[seq[j]])


def brute_force(model, tokens, prefix, context, domain=None):
    """Each token scored with its context built by hand: the whole prefix when the document fits,
    else the lm-eval rule (block b of `context` tokens reads the `context` tokens before the
    block's end; the last block ends at the document's end)."""
    seq = [prefix, *tokens]
    n = len(tokens)
    total = 0.0
    for j in range(1, n + 1):
        if n <= context or j <= context:
            lo = 0
        else:
            end = min(-(-j // context) * context, n)  # the end of token j's block
            lo = end - context
        total += token_nll(model, seq, lo, j, domain)
    return total


def docs_of(lengths, seed=0, vocab=256):
    g = np.random.default_rng(seed)
    return [(g.integers(0, vocab, n).astype(np.uint16), 3 * n + 1) for n in lengths]


@pytest.mark.parametrize("lengths", [[5, 20], [1], [64], [65, 150]])
def test_scores_equal_brute_force(lengths):
    model = tiny_model(seed=1, max_seq_len=64)
    docs = docs_of(lengths)
    for context in (64, 16):
        sc = score_documents(model, docs, 256, context, batch_size=3, pad_id=258)
        for i, (t, nb) in enumerate(docs):
            want = brute_force(model, t.tolist(), 256, context)
            assert sc.nats[i] == pytest.approx(want, rel=1e-5), (lengths, context, i)
            assert sc.tokens[i] == len(t) and sc.bytes[i] == nb


def test_stride_scores_equal_a_slow_loop():
    model = tiny_model(seed=2, max_seq_len=32)
    docs = docs_of([3, 50, 90], seed=3)
    context, stride = 16, 5
    sc = score_documents(model, docs, 256, context, stride=stride, batch_size=2, pad_id=258)
    for i, (t, _) in enumerate(docs):
        seq = [256, *t.tolist()]
        slow = 0.0
        for begin, end, targets in hf_guide(len(t), context, stride):
            x = torch.tensor([seq[begin:end]])
            with torch.no_grad():
                logp = torch.log_softmax(model(x).logits[0].double(), -1)
            slow -= sum(float(logp[j - 1 - begin, seq[j]]) for j in targets)
        assert sc.nats[i] == pytest.approx(slow, rel=1e-5)


def test_batching_gives_the_unbatched_numbers():
    model = tiny_model(seed=4, max_seq_len=32)
    docs = docs_of([1, 7, 31, 32, 33, 80, 5, 64], seed=5)
    one = score_documents(model, docs, 256, 32, batch_size=1, pad_id=258)
    many = score_documents(model, docs, 256, 32, batch_size=8, pad_id=258)
    np.testing.assert_allclose(many.nats, one.nats, rtol=1e-6)
    for d in range(len(docs)):  # each document alone, unbatched, in a call of its own
        alone = score_documents(model, [docs[d]], 256, 32, batch_size=1, pad_id=258)
        assert alone.nats[0] == pytest.approx(one.nats[d], rel=1e-6)
    assert (one.tokens == [len(t) for t, _ in docs]).all()


def test_domain_routed_moe_gets_its_hint():
    model = tiny_model(seed=5, experts=("text", "code"), router="domain", max_seq_len=32)
    docs = docs_of([10, 40], seed=6)
    for expert in (0, 1):
        sc = score_documents(model, docs, 256, 32, batch_size=4, pad_id=258, domain=expert)
        for i, (t, _) in enumerate(docs):
            want = brute_force(model, t.tolist(), 256, 32, domain=expert)
            assert sc.nats[i] == pytest.approx(want, rel=1e-5)
        assert sc.routing.shape == (2, 2)
        assert (sc.routing[:, expert] == 50).all() and (sc.routing[:, 1 - expert] == 0).all()
    with pytest.raises(ValueError, match="router=domain needs the domain"):
        score_documents(model, docs, 256, 32, pad_id=258)


# ----------------------------------------------------------------------------- data and reports


def _texts(tmp_path):
    a = tmp_path / "a.txt"
    b = tmp_path / "b.txt"
    a.write_text("".join(f"Paragraph {i}: the river ran on past the mill.\n\n" for i in range(40)))
    b.write_text("".join(f"Line {i} of the second file, a little longer.\n" for i in range(30)))
    return a, b


def test_evaluation_sets_keep_whole_files_rows_and_records(tmp_path):
    a, b = _texts(tmp_path)
    fa = tmp_path / "g.fa"
    recs = {"r1": "ACGT" * 1500, "r2": "GATTACA" * 900}
    fa.write_text("".join(f">{k}\n{v}\n" for k, v in recs.items()))
    rows = tmp_path / "t.jsonl"
    rows.write_text("".join(json.dumps({"text": f"row {i} " * 200}) + "\n" for i in range(3)))
    cfg = DataConfig(domains=["poems", "genes", "rows"], sources={
        "poems": SourceConfig(kind="files", paths=[str(a), str(b)]),
        "genes": SourceConfig(kind="files", paths=[str(fa)]),
        "rows": SourceConfig(kind="files", paths=[str(rows)])})  # fmt: skip
    dm = DomainDataModule(cfg, heldout_only={"poems", "genes", "rows"})
    docs = dm.heldout_documents("poems")
    assert [nb for _, nb in docs] == [a.stat().st_size, b.stat().st_size]
    assert bytes(docs[0][0].tolist()) == a.read_bytes()  # whole, tokenized alone
    assert dm.tokens("poems").stats["heldout_documents"] > 2  # the packed stream keeps pieces
    assert [nb for _, nb in dm.heldout_documents("genes")] == [len(v) for v in recs.values()]
    assert [nb for _, nb in dm.heldout_documents("rows")] == [
        len((f"row {i} " * 200).encode()) for i in range(3)]
    # a training corpus is still cut into pieces
    train = DomainDataModule(DataConfig(domains=["poems"], bytes_per_domain=10**6, sources={
        "poems": SourceConfig(kind="files", paths=[str(a), str(b)])}))  # fmt: skip
    assert len(train.heldout_documents("poems")) + train.tokens("poems").stats[
        "train_documents"] > 2


def test_genome_regions_are_the_heldout_documents():
    cfg = DataConfig(domains=["dna"], bytes_per_domain=60_000)
    dm = DomainDataModule(cfg)
    docs = dm.heldout_documents("dna")
    t = dm.tokens("dna")
    assert sum(nb for _, nb in docs) == t.stats["heldout_bytes"]
    assert len(docs) < t.stats["heldout_documents"]  # 256-base windows joined into regions
    assert max(nb for _, nb in docs) <= 4096
    # the packed stream's bodies, joined by unit, are the documents (byte tokenizer)
    stream = t.heldout.astype(np.int64)
    body = stream[stream < 256]
    assert (np.concatenate([d for d, _ in docs]).astype(np.int64) == body).all()


def test_report_states_the_protocol_and_per_document_nll(tmp_path):
    a, b = _texts(tmp_path)
    model = tiny_model(seed=7, max_seq_len=64)
    cfg = DataConfig(domains=["poems"], seq_len=32, sources={
        "poems": SourceConfig(kind="files", paths=[str(a), str(b)])})  # fmt: skip
    rep = evaluate_model(model, cfg, 0, ["poems"], progress=False, heldout_only={"poems"})
    assert rep["protocol"] == {"kind": "rolling", "context": 64, "stride": None, "prefix": "bos",
                               "documents": 2, "documents_total": 2, "sampled": False,
                               "max_docs": None}  # fmt: skip
    d = rep["domains"]["poems"]
    per = d["per_document"]
    assert math.fsum(per["nats"]) == pytest.approx(d["loss"] * d["tokens"], rel=1e-12)
    assert sum(per["bytes"]) == d["bytes"] == a.stat().st_size + b.stat().st_size
    assert sum(per["tokens"]) == d["tokens"] == d["bytes"]  # bytes: no BOS/EOS scored
    assert d["bpb"] == pytest.approx(math.fsum(per["nats"]) / d["bytes"] / math.log(2))
    one = evaluate_model(model, cfg, 0, ["poems"], progress=False, heldout_only={"poems"},
                         max_docs=1, stride=16, context=32)  # fmt: skip
    p = one["protocol"]
    assert (p["documents"], p["documents_total"], p["sampled"], p["stride"]) == (1, 2, True, 16)
    assert one["domains"]["poems"]["per_document"]["bytes"] == [a.stat().st_size]
    line = format_table([one]).splitlines()[0]
    assert line.startswith("protocol: rolling") and "stride 16" in line and "1 of 2" in line
    chunks = evaluate_model(model, cfg, 0, ["poems"], 0, progress=False, heldout_only={"poems"},
                            protocol="chunks")  # fmt: skip
    assert chunks["protocol"]["kind"] == "chunks"
    with pytest.raises(ConfigError, match="max_batches belongs to protocol='chunks'"):
        evaluate_model(model, cfg, 0, ["poems"], 4, heldout_only={"poems"})


def test_prefix_is_eos_for_a_tokenizer_without_bos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from moe.data.tokenizer import HFTokenizer
    from moe.eval.rolling import prefix_token

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "a": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert prefix_token(HFTokenizer(tmp_path)) == (1, "eos")
    assert prefix_token(ByteTokenizer()) == (256, "bos")


def test_moe_eval_json_and_refusals(tmp_path, capsys):
    a, b = _texts(tmp_path)
    ck = save_tiny(tmp_path / "ck", seed=8, experts=("poems", "code"), router="domain")
    out = tmp_path / "e.json"
    assert main(["eval", str(ck), "--data", f"poems={a}", "--data", f"other={b}",
                 "--json", str(out)]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("protocol: rolling log-likelihood")
    rep = json.loads(out.read_text())
    assert rep["protocol"]["context"] == 64 and rep["protocol"]["documents"] == 1
    assert rep["domains"]["other"]["note"] == "no expert for this domain"
    assert rep["routing"]["share"]["poems"][0] == [1.0, 0.0]
    assert len(rep["domains"]["poems"]["per_document"]["nats"]) == 1
    for argv, msg in ((["--context", "65"], "--context 65"), (["--stride", "64"], "--stride 64"),
                      (["--context", "8", "--stride", "9"], "--stride 9"),
                      (["--max-docs", "0"], "--max-docs"), (["--max-batches", "2"],
                                                             "replaced by --max-docs")):
        target = tmp_path / "never.json"
        rc = main(["eval", str(ck), "--data", f"poems={a}", "--json", str(target), *argv])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and err.count("\n") == 1, err
        assert not target.exists()


def test_disk_cache_keeps_the_documents_and_stale_caches_rebuild(tmp_path):
    from moe.data import datamodule as dmod

    cfg = DataConfig(domains=["code"], bytes_per_domain=30_000, cache_dir=str(tmp_path))
    dmod._MEMORY.clear()  # another test may have built this corpus in this process already
    built = DomainDataModule(cfg).heldout_documents("code")
    dmod._MEMORY.clear()
    (path,) = tmp_path.glob("code-*.npz")
    again = DomainDataModule(cfg).heldout_documents("code")  # read back from disk
    assert [(t.tolist(), nb) for t, nb in again] == [(t.tolist(), nb) for t, nb in built]
    with np.load(path) as z:  # a cache written before documents were kept: rebuilt
        np.savez(path, train=z["train"], heldout=z["heldout"], stats=z["stats"])
    assert dmod._load(path) is None


def test_context_beyond_the_trained_length_is_said(tmp_path, capsys):
    """A model last trained on shorter sequences than its max_seq_len is scored at max_seq_len
    (the model's context), and the protocol line says so and how to stay within them; an
    import (no recipe) says nothing."""
    from moe.io.checkpoint import make_meta, save_checkpoint

    a, _ = _texts(tmp_path)
    m = tiny_model(seed=9, max_seq_len=64)
    meta = make_meta(kind="dense", recipe={"data": {"seq_len": 16}})
    ck = save_checkpoint(tmp_path / "ck", m.state_dict(), m.config, meta)
    for argv, said in (([], True), (["--context", "16"], False)):
        out = tmp_path / f"e{len(argv)}.json"
        assert main(["eval", str(ck), "--data", f"poems={a}", "--json", str(out), *argv]) == 0
        line = capsys.readouterr().out.splitlines()[0]
        p = json.loads(out.read_text())["protocol"]
        assert (p.get("trained_seq_len") == 16) is said
        assert ("longer than the 16-token sequences" in line) is said, line
    plain = save_tiny(tmp_path / "imported", seed=9)
    out = tmp_path / "i.json"
    assert main(["eval", str(plain), "--data", f"poems={a}", "--json", str(out)]) == 0
    assert "longer than" not in capsys.readouterr().out
