"""A BPE tokenizer end to end (pack -> train -> eval, bits per byte checked by hand against the
byte model's denominator), tokenizer mismatch refusals, and `moe eval --data`."""

import gzip
import json

import pytest
from helpers import DEBUG
from tokenizer_fixtures import (
    bpe_checkpoint,
    bpe_tokenizer,
    hand_bpb,
    merge_yaml,
    two_tokenizer_checkpoints,
)

from moe.cli import main
from moe.config import ConfigError, load_recipe
from moe.data.tokenizer import ByteTokenizer, load_tokenizer
from moe.eval.data_spec import parse_data_spec
from moe.eval.evaluate import evaluate_checkpoint
from moe.io.checkpoint import load_checkpoint
from moe.model.transformer import Transformer

QUIET = "trainer.enable_progress_bar=false"
SHORT = "Emma Woodhouse, handsome, clever, and rich — naïve? 😀"
TRAIN = [QUIET, "data.domains=[text]", "data.bytes_per_domain=30000", "trainer.max_steps=4",
         "trainer.val_check_interval=4", "trainer.limit_val_batches=1"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    tok = bpe_tokenizer(root / "tok")
    bpe, byte = root / "bpe-run", root / "byte-run"
    assert main(["train", str(DEBUG / "dense.yaml"), f"out_dir={bpe}", f"data.tokenizer={tok}",
                 "model.vocab_size=400", *TRAIN]) == 0  # fmt: skip
    assert main(["train", str(DEBUG / "dense.yaml"), f"out_dir={byte}", *TRAIN]) == 0
    return {"root": root, "tok": tok, "bpe": bpe / "model", "byte": byte / "model"}


def _model(ck):
    c = load_checkpoint(ck)
    m = Transformer(c.config)
    m.load_state_dict(c.state_dict)
    return m.eval()


def test_trained_checkpoint_carries_its_tokenizer(runs):
    ck = runs["bpe"]
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["tokenizer"]["sha256"] == load_tokenizer(runs["tok"]).sha256
    assert (ck / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((runs["byte"] / "meta.json").read_text())["tokenizer"]["kind"] == "byte"
    # a continued run picks the tokenizer up from init= alone
    r = load_recipe(DEBUG / "dense.yaml", [f"init={ck}", "data.domains=[text]"])
    from moe.train.stages import plan_stage

    assert plan_stage(r).tokenizer.sha256 == meta["tokenizer"]["sha256"]


def test_bpb_by_hand_and_one_denominator(runs, tmp_path):
    """One short document, evaluated through `moe eval --data`: the BPE model's and the byte
    model's bits per byte equal the hand computation, over the same UTF-8 bytes."""
    f = tmp_path / "short.jsonl"
    f.write_text(json.dumps({"text": SHORT}) + "\n")
    data = parse_data_spec([f"text={f}"])
    n_bytes = len(SHORT.encode())
    tok = load_tokenizer(runs["tok"])
    got = {}
    for name, t in (("bpe", tok), ("byte", ByteTokenizer())):
        rep = evaluate_checkpoint(runs[name], progress=False, data=data)
        d = rep["domains"]["text"]
        ids = [t.bos_id, *t.encode(SHORT)]  # the document alone after BOS (lm-eval's rolling)
        assert d["bytes"] == n_bytes and d["tokens"] == len(ids) - 1
        assert d["bpb"] == pytest.approx(hand_bpb(_model(runs[name]), ids, n_bytes), rel=1e-5)
        got[name] = d
    assert got["bpe"]["tokens"] < got["byte"]["tokens"]  # BPE: fewer, longer tokens


def test_eval_data_glob_of_gz_text(runs, tmp_path, capsys):
    d = tmp_path / "held"
    d.mkdir()
    texts = ["First file. The cat sat on the mat.\n\nA second paragraph here.\n",
             "Second file, with ümlauts and more words to read.\n"]
    for i, t in enumerate(texts):
        (d / f"part{i}.txt.gz").write_bytes(gzip.compress(t.encode()))
    out = tmp_path / "r.json"
    rc = main(["eval", str(runs["bpe"]), str(runs["byte"]), "--data", f"mine={d}/*.txt.gz",
               "--json", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    reps = json.loads(out.read_text())
    total = sum(len(t.encode()) for t in texts)
    for rep in reps:
        assert list(rep["domains"]) == ["mine"] and rep["domains"]["mine"]["bytes"] == total
        assert rep["data"]["heldout_only"] == ["mine"]
    assert reps[0]["tokenizer"]["kind"] == "hf" and reps[1]["tokenizer"]["kind"] == "byte"
    assert not (runs["bpe"] / "eval-data.json").exists()
    # no --json: eval-data.json beside each checkpoint, its eval.json untouched
    assert main(["eval", str(runs["byte"]), "--data", f"text={d}/part0.txt.gz"]) == 0
    assert (runs["byte"] / "eval-data.json").is_file()
    assert not (runs["byte"] / "eval.json").exists()


def test_eval_data_recipe_and_mistakes(runs, tmp_path, capsys):
    rep = evaluate_checkpoint(runs["bpe"], max_docs=2, progress=False,
                              data=parse_data_spec([str(DEBUG / "dense.yaml")]),
                              domains=["code"])  # fmt: skip
    assert list(rep["domains"]) == ["code"] and rep["domains"]["code"]["bytes"] > 0
    with pytest.raises(ConfigError, match="no file matches"):
        parse_data_spec([f"text={tmp_path}/none/*.gz"])
    with pytest.raises(ConfigError, match="neither a recipe file"):
        parse_data_spec(["nothing-here.yaml"])
    with pytest.raises(ConfigError, match="hf:NAME"):
        parse_data_spec(["text=hf:a:b:c:d"])
    src = parse_data_spec(["text=hf:org/set:validation"]).sources["text"]
    assert (src.kind, src.name, src.split) == ("hf", "org/set", "validation")
    f = tmp_path / "a.txt"
    f.write_text("some words\n")
    with pytest.raises(ConfigError, match="not in --data"):
        evaluate_checkpoint(runs["bpe"], ["code"], data=parse_data_spec([f"text={f}"]))
    rc = main(["eval", str(runs["bpe"]), "--data", f"text={tmp_path}/no/*.txt.gz"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no file matches" in err
    assert not (runs["bpe"] / "eval-data.json").exists()


def test_tokenizer_mismatch_refusals(runs, tmp_path):
    from moe.merge import merge
    from moe.surgery.experts import assemble_checkpoints
    from moe.train.stages import plan_stage

    a, b = two_tokenizer_checkpoints(tmp_path)
    with pytest.raises(ConfigError, match="different tokenizers"):
        merge(merge_yaml(tmp_path, a, b), out=tmp_path / "merged", progress=False)
    with pytest.raises(ConfigError, match="different tokenizers"):
        assemble_checkpoints([a, b], tmp_path / "btx")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "btx").exists()
    # init= a BPE checkpoint with another tokenizer, or a byte checkpoint with a BPE one
    other = tmp_path / "tok-b"
    with pytest.raises(ConfigError, match="is another one"):
        plan_stage(load_recipe(DEBUG / "dense.yaml", [f"init={runs['bpe']}",
                                                      f"data.tokenizer={other}"]))  # fmt: skip
    with pytest.raises(ConfigError, match="is another one"):
        over = [f"init={runs['byte']}", f"data.tokenizer={runs['tok']}"]
        plan_stage(load_recipe(DEBUG / "dense.yaml", over))
    # a tokenizer larger than the model's embedding
    with pytest.raises(ConfigError, match="more than the model's embedding"):
        plan_stage(load_recipe(DEBUG / "dense.yaml", [f"data.tokenizer={runs['tok']}"]))
    # same tokenizer: merge works and the result carries it
    c = bpe_checkpoint(tmp_path / "ck-c", tmp_path / "tok-a", seed=2, domain="text")
    out = merge(merge_yaml(tmp_path, a, c), out=tmp_path / "merged-ok", progress=False)
    assert load_tokenizer(out / "tokenizer").sha256 == load_tokenizer(tmp_path / "tok-a").sha256


def test_split_and_assemble_carry_the_tokenizer(runs, tmp_path):
    from moe.surgery.experts import assemble_checkpoints, split_checkpoint

    sha = load_tokenizer(runs["tok"]).sha256
    moe = split_checkpoint(runs["bpe"], tmp_path / "split", ["text", "code"],
                           method="activation", calib_batches=1)  # fmt: skip
    assert load_tokenizer(moe / "tokenizer").sha256 == sha
    btx = assemble_checkpoints([runs["bpe"], runs["bpe"]], tmp_path / "btx",
                               experts=["text", "code"], router_init="domain_mean",
                               calib_batches=1)  # fmt: skip
    assert json.loads((btx / "meta.json").read_text())["tokenizer"]["sha256"] == sha


def test_imported_without_tokenizer(tmp_path, runs):
    from generate_fixtures import no_tokenizer_checkpoint

    from moe.train.stages import plan_stage

    bare = no_tokenizer_checkpoint(tmp_path / "bare")  # vocabulary 300, no tokenizer/
    with pytest.raises(ConfigError, match="--tokenizer PATH"):
        evaluate_checkpoint(bare, ["text"], max_docs=2, progress=False)
    with pytest.raises(ConfigError, match="data.tokenizer=PATH"):
        plan_stage(load_recipe(DEBUG / "dense.yaml", [f"init={bare}"]))
    small = bpe_tokenizer(tmp_path / "tok300", vocab_size=300)
    rep = evaluate_checkpoint(bare, ["text"], max_docs=2, progress=False, tokenizer=str(small))
    assert rep["domains"]["text"]["bpb"] > 0
