"""moe.eval.harness: the lm-evaluation-harness model over moe-forge checkpoints.

The agreement test runs a tiny random checkpoint through our adapter and its `moe export`
through lm-eval's own Hugging Face model (HFLM, float32, CPU) on the two offline tasks in
tests/data/lm_eval_tasks/, and holds every request's log-likelihood and every metric equal."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from moe.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "tests" / "data" / "lm_eval_tasks"
TASK_NAMES = ["moe_phrases", "moe_shakespeare_ppl"]
MISSING = "lm-eval is not installed (pip install 'moe-forge[lmeval]')"

needs_lmeval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-eval is not installed (pip install 'moe-forge[lmeval]')",
)
needs_hf = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None
    or importlib.util.find_spec("tokenizers") is None,
    reason="transformers/tokenizers are not installed (pip install 'moe-forge[hf]')",
)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    """The shipped task YAMLs with absolute data_files (and the datasets cache in tmp)."""
    import yaml

    out = tmp_path_factory.mktemp("lm_eval_tasks")
    for f in sorted(TASKS.glob("*.yaml")):
        cfg = yaml.safe_load(f.read_text())
        kw = cfg["dataset_kwargs"]
        kw["data_files"] = {k: str(REPO / v) for k, v in kw["data_files"].items()}
        kw["cache_dir"] = str(out / "datasets-cache")
        (out / f.name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def _pair(root: Path, kind: str) -> tuple[Path, Path]:
    """A tiny random dense checkpoint (byte or BPE tokenizer) and its Hugging Face export."""
    from generate_fixtures import save_tiny
    from tokenizer_fixtures import bpe_checkpoint, bpe_tokenizer

    from moe.io.hf_export import export_hf

    ck = root / f"ck-{kind}"
    if kind == "byte":
        save_tiny(ck, seed=3)
    else:
        bpe_checkpoint(ck, bpe_tokenizer(root / "tok"), seed=3)
    return ck, export_hf(ck, root / f"hf-{kind}")


@pytest.fixture(scope="module")
def byte_ck(tmp_path_factory):
    from generate_fixtures import save_tiny

    return save_tiny(tmp_path_factory.mktemp("byte") / "ck", seed=5)


def _resp(r):
    """A sample's response: (loglikelihood, is_greedy), or (loglikelihood, None) when rolling."""
    while isinstance(r, (list, tuple)) and len(r) == 1:
        r = r[0]
    return (float(r[0]), bool(r[1])) if isinstance(r, (list, tuple)) else (float(r), None)


def _plain(v):
    return json.loads(json.dumps(v, default=str))


# --------------------------------------------------------------------------- agreement


@needs_lmeval
@needs_hf
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_agrees_with_lm_eval_hf_model(kind, tasks_dir, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from moe.eval import harness

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ck, hf_dir = _pair(tmp_path, kind)
    ours = harness.run_tasks(ck, TASK_NAMES, include_path=tasks_dir, domain=None, batch_size=3,
                             limit=None, device="cpu", log_samples=True,
                             bootstrap_iters=0)  # fmt: skip
    # float64 log-softmax and sums in HFLM (where it has the option): its float32 sums of a
    # window's log-probabilities carry a rounding error of a few 1e-5 that ours (float64) lacks
    has = "softmax_dtype" in inspect.signature(HFLM).parameters
    kw = {"softmax_dtype": "float64"} if has else {}
    hf = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=3, **kw)
    theirs = simple_evaluate(model=hf, tasks=TASK_NAMES, log_samples=True, bootstrap_iters=0,
                             task_manager=harness.task_manager(TASK_NAMES, tasks_dir))  # fmt: skip

    worst = {}
    for task in TASK_NAMES:
        a, b = ours["samples"][task], theirs["samples"][task]
        assert len(a) == len(b) > 0
        diffs = []
        for x, y in zip(sorted(a, key=lambda s: s["doc_id"]), sorted(b, key=lambda s: s["doc_id"])):
            assert x["doc_id"] == y["doc_id"] and len(x["resps"]) == len(y["resps"])
            assert _plain(x["arguments"]) == _plain(y["arguments"])  # the same requests
            for rx, ry in zip(x["resps"], y["resps"]):
                (lx, gx), (ly, gy) = _resp(rx), _resp(ry)
                diffs.append(abs(lx - ly))
                assert abs(lx - ly) <= 1e-4, (task, x["doc_id"], lx, ly)
                assert gx == gy
        worst[task] = max(diffs)
        ma, mb = ours["results"][task], theirs["results"][task]
        for key, va in ma.items():
            if "stderr" in key or not isinstance(va, float):
                continue
            assert math.isclose(va, mb[key], rel_tol=1e-6), (task, key, va, mb[key])
            worst[f"{task} {key}"] = abs(va - mb[key]) / abs(mb[key])
    print(f"\n[{kind}] max abs difference per request / rel. difference per metric:", worst)

    # `moe eval --data` on the task's documents (each JSONL row a document) gives lm-eval's
    # bits_per_byte: the same documents, windows, prefix token and byte count
    from moe.cli import main

    out = tmp_path / f"eval-{kind}.json"
    jsonl = REPO / "tests" / "data" / "lm_eval_tasks" / "shakespeare.jsonl"
    assert main(["eval", str(ck), "--data", f"text={jsonl}", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    bpb = theirs["results"]["moe_shakespeare_ppl"]["bits_per_byte,none"]
    assert rep["domains"]["text"]["documents"] == len(theirs["samples"]["moe_shakespeare_ppl"])
    assert math.isclose(rep["domains"]["text"]["bpb"], bpb, rel_tol=1e-6), (
        rep["domains"]["text"]["bpb"], bpb)

    # generation: greedy, same text and the same cut at a stop string
    lm = harness.MoEForgeLM(pretrained=str(ck), device="cpu")
    asks = [("First Citizen:\nWe are", {"until": ["\n"], "max_gen_toks": 20}),
            ("ROMEO:", {"max_gen_toks": 30})]  # fmt: skip
    reqs = [Instance("generate_until", {}, a, i) for i, a in enumerate(asks)]
    assert lm.generate_until(reqs, disable_tqdm=True) == hf.generate_until(reqs, disable_tqdm=True)


@needs_lmeval
def test_registered_name_and_instance(byte_ck, tasks_dir):
    """simple_evaluate(model="moe-forge", model_args=...) and an instance give one result."""
    from lm_eval import simple_evaluate

    from moe.eval import harness

    cls = harness.register()
    assert harness.MoEForgeLM is cls
    manager = harness.task_manager(["moe_phrases"], tasks_dir)
    by_name = simple_evaluate(model="moe-forge", model_args=f"pretrained={byte_ck},batch_size=2",
                              tasks=["moe_phrases"], task_manager=manager, limit=3,
                              bootstrap_iters=0)  # fmt: skip
    by_obj = simple_evaluate(model=cls(pretrained=byte_ck), tasks=["moe_phrases"], limit=3,
                             task_manager=manager, bootstrap_iters=0)  # fmt: skip
    ra, rb = by_name["results"]["moe_phrases"], by_obj["results"]["moe_phrases"]
    assert ra["acc,none"] == rb["acc,none"] and ra["acc_norm,none"] == rb["acc_norm,none"]
    assert [s["resps"] for s in by_name["samples"]["moe_phrases"]] == [
        s["resps"] for s in by_obj["samples"]["moe_phrases"]]  # fmt: skip


# --------------------------------------------------------------------------- domain routing


@needs_lmeval
def test_domain_routed_moe_uses_that_expert(tmp_path):
    from generate_fixtures import save_tiny
    from lm_eval.api.instance import Instance

    from moe.eval import harness
    from moe.io.checkpoint import load_model

    ck = save_tiny(tmp_path / "moe", seed=2, kind="moe", experts=("text", "code"),
                   router="domain")  # fmt: skip
    model = load_model(ck).model.eval()
    ctx, cont = "def main(", "):\n    return 0"
    ids = list(ctx.encode()) + list(cont.encode())
    x = torch.tensor([ids[:-1]])

    def by_hand(expert: int) -> float:
        with torch.no_grad():
            logp = model(x, domain=torch.tensor([expert])).logits.float().log_softmax(-1)[0]
        n = len(cont.encode())
        return float(sum(logp[len(ids) - 1 - n + i, t] for i, t in enumerate(ids[-n:])))

    req = [Instance("loglikelihood", {}, (ctx, cont), 0)]
    got = harness.MoEForgeLM(pretrained=ck, domain="code").loglikelihood(req, disable_tqdm=True)
    assert abs(got[0][0] - by_hand(1)) < 1e-4
    assert abs(by_hand(0) - by_hand(1)) > 1e-3  # the experts differ: the domain matters
    text = harness.MoEForgeLM(pretrained=ck, domain="text").loglikelihood(req, disable_tqdm=True)
    assert abs(text[0][0] - by_hand(0)) < 1e-4

    # rolling: the same windows and sums as moe's own rolling evaluation (moe/eval/rolling.py)
    import numpy as np

    from moe.eval.rolling import score_documents

    doc = (TASKS / "shakespeare.jsonl").read_text().splitlines()[1]
    doc = json.loads(doc)["text"]
    lm = harness.MoEForgeLM(pretrained=ck, domain="code", batch_size=2)
    ours = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (doc,), 0)],
                                    disable_tqdm=True)  # fmt: skip
    tokens = np.array(list(doc.encode()), dtype=np.int64)
    ref = score_documents(model, [(tokens, len(tokens))], prefix=256, context=64, domain=1)
    assert abs(ours[0] + float(ref.nats[0])) < 1e-4 and len(tokens) > 3 * 64

    with pytest.raises(ConfigError, match="give the domain .*text, code"):
        harness.MoEForgeLM(pretrained=ck)
    with pytest.raises(ConfigError, match="'dna' is not an expert"):
        harness.MoEForgeLM(pretrained=ck, domain="dna")


# --------------------------------------------------------------------------- generation


@needs_lmeval
def test_generate_until_stops_at_a_stop_string(byte_ck):
    from lm_eval.api.instance import Instance

    from moe.eval import harness
    from moe.generate import generate

    lm = harness.MoEForgeLM(pretrained=byte_ck, device="cpu")
    prompt = "To be, or not"

    def gen(**kw):
        return lm.generate_until([Instance("generate_until", {}, (prompt, kw), 0)],
                                 disable_tqdm=True)[0]  # fmt: skip

    full = gen(max_gen_toks=24)
    assert full == generate(lm.model, lm.tokenizer, prompt, 24, add_bos=False).text
    # a stop string of two printable ASCII characters inside the text, at its first occurrence
    k = next(i for i in range(2, len(full) - 1)
             if full[i : i + 2].isascii() and full[i : i + 2].isprintable()
             and full.find(full[i : i + 2]) == i)  # fmt: skip
    stop = full[k : k + 2]
    assert gen(until=[stop], max_gen_toks=24) == full[:k]
    assert gen(until=stop, max_gen_toks=24) == full[:k]
    assert gen(max_gen_toks=5) == full[: len(gen(max_gen_toks=5))]
    with pytest.raises(ConfigError, match="max_gen_toks 64 leaves no room"):
        gen(max_gen_toks=64)


# --------------------------------------------------------------------------- errors


def test_without_lm_eval_one_line_error(monkeypatch, byte_ck):
    """With lm-eval not importable, importing the module works and using it is one line."""
    import moe.eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    monkeypatch.delitem(sys.modules, "moe.eval.harness", raising=False)  # a fresh import
    monkeypatch.delattr(moe.eval, "harness", raising=False)
    harness = importlib.import_module("moe.eval.harness")
    for use in (lambda: harness.run_tasks(byte_ck, ["moe_phrases"]),
                lambda: harness.MoEForgeLM, harness.register):  # fmt: skip
        with pytest.raises(ConfigError) as e:
            use()
        assert str(e.value) == MISSING


@needs_lmeval
def test_unknown_task_names_it_and_the_local_ones(monkeypatch, tasks_dir, byte_ck):
    import lm_eval.tasks

    from moe.eval import harness

    real = lm_eval.tasks.TaskManager

    def local_only(*a, **kw):  # lm-eval's 14k built-in tasks take seconds to index
        return real(*a, **{**kw, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", local_only)
    with pytest.raises(ConfigError) as e:
        harness.run_tasks(byte_ck, ["moe_phrases", "nope"], include_path=tasks_dir)
    msg = str(e.value)
    assert "\n" not in msg and "unknown lm-eval task 'nope'" in msg
    assert "moe_phrases, moe_shakespeare_ppl" in msg
    with pytest.raises(ConfigError, match="no such directory"):
        harness.run_tasks(byte_ck, ["moe_phrases"], include_path=tasks_dir / "missing")
    with pytest.raises(ConfigError, match="give --include-path"):
        harness.task_manager(["nope"])


@needs_lmeval
def test_bad_model_args(byte_ck):
    from moe.eval import harness

    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        harness.MoEForgeLM(pretrained=byte_ck, batch_size="auto")
    with pytest.raises(ConfigError, match="beyond the model's context"):
        harness.MoEForgeLM(pretrained=byte_ck, max_length=65)
    with pytest.raises(ConfigError, match="give the checkpoint"):
        harness.MoEForgeLM()
    with pytest.raises(ConfigError, match="dtype 'int8'"):
        harness.MoEForgeLM(pretrained=byte_ck, dtype="int8")


# --------------------------------------------------------------------------- moe eval --tasks


@needs_lmeval
def test_cli_tasks_writes_lm_eval_results(byte_ck, tasks_dir, tmp_path, capsys):
    """`moe eval CK --tasks ... --include-path DIR`: lm-eval's table printed, its results JSON
    written, the same numbers run_tasks gives."""
    from moe.cli import main
    from moe.eval import harness

    out = tmp_path / "lm.json"
    argv = ["eval", str(byte_ck), "--tasks", ",".join(TASK_NAMES), "--include-path",
            str(tasks_dir), "--limit", "3", "--json", str(out), "--batch-size", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "moe_phrases" in printed and "bits_per_byte" in printed and "at most 3" in printed
    rep = json.loads(out.read_text())
    direct = harness.run_tasks(byte_ck, TASK_NAMES, include_path=tasks_dir, limit=3,
                               batch_size=2, device="cpu")  # fmt: skip
    for task in TASK_NAMES:
        assert rep["results"][task] == direct["results"][task]
    assert rep["checkpoint"] == str(byte_ck)
    # the default target: lm-eval.json beside the checkpoint's weights
    assert main(argv[:-4] + ["--batch-size", "2"]) == 0
    assert json.loads((Path(byte_ck) / "lm-eval.json").read_text())["results"] == rep["results"]
    (Path(byte_ck) / "lm-eval.json").unlink()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "no_such_task"], "unknown lm-eval task 'no_such_task'"),
        (["--tasks", " , "], "at least one lm-eval task"),
        (["--tasks", "moe_phrases", "--stride", "4"], "--stride belongs to moe eval's own"),
        (["--tasks", "moe_phrases", "--context", "100000"], "--context 100000"),
        (["--tasks", "moe_phrases", "--domains", "text,code"], "names one domain"),
        (["--limit", "3"], "--limit belongs to --tasks"),
    ],
)
def test_cli_tasks_bad_input_one_line_nothing_written(byte_ck, tasks_dir, tmp_path, capsys,
                                                      extra, message):  # fmt: skip
    from moe.cli import main

    if extra[:1] == ["--tasks"] and extra[1] == "no_such_task" \
            and importlib.util.find_spec("lm_eval") is None:
        message = MISSING
    out = tmp_path / "lm.json"
    before = sorted(p.name for p in Path(byte_ck).iterdir())
    code = main(["eval", str(byte_ck), "--include-path", str(tasks_dir), "--json", str(out),
                 *extra]) if extra[0] == "--tasks" else main(["eval", str(byte_ck), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists() and sorted(p.name for p in Path(byte_ck).iterdir()) == before


def test_cli_tasks_without_lm_eval(monkeypatch, byte_ck, tmp_path, capsys):
    from moe.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
    code = main(["eval", str(byte_ck), "--tasks", "moe_phrases", "--json", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"moe: error: {MISSING}"], err
    assert not (tmp_path / "x").exists()
