"""No command damages data (issue #23): one rule for every command that writes (moe/io/output.py).

For every writing command: an output that is, or lies inside, one of its inputs (or an input
inside the output) is refused in one line with nothing changed on disk (a byte snapshot of every
fixture before and after), and a second writer of an output another job holds is refused in one
line `OUT is in use by another job (pid N)` with nothing created. The other job is this test
process holding the output's lock (`OutputLock`), so nothing races; two real writers (one
in-process, one `python -m moe.cli` started while the first holds its claim) are tested too.
Then: `train --overwrite` on a locked run keeps its logs/ and resume/, and a failed resume leaves
recipe.yaml (and everything else) byte-identical and exits 2.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from generate_fixtures import save_tiny
from helpers import DEBUG, REPO

from moe.cli import main
from moe.io.output import OutputError, OutputLock, check_outputs, claim, lock_path

pytestmark = pytest.mark.reliability

QUIET = "trainer.enable_progress_bar=false"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def one_error_line(err: str, *needles: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "no message"
    line = lines[-1]
    assert line.startswith("moe: error: "), err[-2000:]
    assert [ln for ln in lines if ln.startswith("moe:")] == [line], err[-2000:]
    for n in needles:
        assert n in line, line
    return line


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and directory (None) under root."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}  # fmt: skip


def fake_run(run: Path, steps: int = 2) -> Path:
    """A run directory of recipes/debug/dense.yaml as a finished `moe train` leaves it (recipe,
    model/, logs/, resume/last.ckpt at `steps`), made without training."""
    from moe.config import load_recipe, to_yaml
    from moe.model.transformer import Transformer

    r = load_recipe(DEBUG / "dense.yaml", [f"out_dir={run}", QUIET])
    model = Transformer(r.model)
    save_tiny(run / "model")
    (run / "logs").mkdir()
    (run / "logs" / "metrics.csv").write_text("step,train_loss\n1,5.5\n2,5.4\n")
    (run / "resume").mkdir()
    torch.save({"global_step": steps, "moe_forge": {"schedule_start": 0},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
               run / "resume" / "last.ckpt")  # fmt: skip
    (run / "recipe.yaml").write_text(to_yaml(r))
    return run


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Inputs of every writing command (random tiny weights: built in about a second) under
    root/, and scratch/ for outputs."""
    from moe.delta import ops
    from moe.io.checkpoint import load_checkpoint, save_checkpoint
    from moe.io.hf_export import export_hf

    root = tmp_path_factory.mktemp("outputs")
    f = {"root": root, "tmp": tmp_path_factory.mktemp("scratch")}
    f["dense"] = save_tiny(root / "dense")
    ck = load_checkpoint(f["dense"])
    meta = {k: v for k, v in ck.meta.items() if k not in ("id", "sha256")}
    ft = {n: t + 0.01 for n, t in ck.state_dict.items()}
    f["ft"] = save_checkpoint(root / "ft", ft, ck.config,
                              dict(meta, id="ft00000000", parents=[ck.meta["id"]]))
    f["delta"] = root / "ft.delta.safetensors"
    ops.extract(f["dense"], f["ft"], f["delta"])
    f["hf"] = export_hf(f["dense"], root / "hf")
    f["merge"] = root / "merge.yaml"
    f["merge"].write_text(f"models:\n  - model: {f['dense']}\n  - model: {f['ft']}\n"
                          "merge_method: linear\n")
    f["run"] = fake_run(root / "run")
    f["study"] = root / "study"  # a study directory holding the corpus its recipe reads
    f["study"].mkdir()
    (f["study"] / "corpus.txt").write_text("the quick brown fox\n" * 200)
    return f


def study_over(fx, *more):
    """A study (or experiment) into fx['study'] whose corpus is a file inside that directory."""
    corpus = fx["study"] / "corpus.txt"
    return [f"out_dir={fx['study']}", "data.sources.text.kind=files",
            f"data.sources.text.paths=[{corpus}]", *more, QUIET, "--overwrite"]


# command -> (argv whose output is, lies inside, or contains one of its inputs; the message)
SAME = {
    "train": (lambda fx: ["train", str(DEBUG / "dense.yaml"), f"out_dir={fx['run']}",
                          f"init={fx['run'] / 'model'}", "--overwrite", QUIET],
              "lies inside the output"),
    "run": (lambda fx: ["run", str(DEBUG / "study.yaml"), *study_over(fx)],
            "corpus.txt lies inside the output"),
    "run-experiment": (lambda fx: ["run", str(REPO / "recipes" / "init" / "debug.yaml"),
                                   *study_over(fx)], "corpus.txt lies inside the output"),
    "sweep": (lambda fx: ["sweep", str(DEBUG / "study.yaml"), "study.budget_steps=80,160",
                          *study_over(fx)],
              "corpus.txt lies inside the output"),
    "eval": (lambda fx: ["eval", str(fx["dense"]), "--json", str(fx["dense"] / "meta.json")],
             "is the input"),
    "generate-json": (lambda fx: ["generate", str(fx["dense"]), "--max-new-tokens", "2",
                                  "--json", str(fx["dense"] / "model.safetensors")],
                      "is the input"),
    "generate-html": (lambda fx: ["generate", str(fx["dense"]), "--max-new-tokens", "2",
                                  "--html", str(fx["dense"] / "config.json")],
                      "is the input"),
    "split": (lambda fx: ["split", str(fx["dense"]), "--experts", "text,code", "--out",
                          str(fx["dense"]), "--overwrite"], "lies inside the output"),
    "assemble": (lambda fx: ["assemble", str(fx["dense"]), str(fx["ft"]), "--experts",
                             "text,code", "--out", str(fx["ft"]), "--overwrite"],
                 "lies inside the output"),
    "merge": (lambda fx: ["merge", str(fx["merge"]), "--out", str(fx["ft"]), "--overwrite"],
              "lies inside the output"),
    "delta-extract": (lambda fx: ["delta", "extract", str(fx["dense"]), str(fx["ft"]), "-o",
                                  str(fx["ft"] / "model.safetensors"), "--overwrite"],
                      "is the input"),
    "delta-compress": (lambda fx: ["delta", "compress", str(fx["delta"]), "topk:0.5", "-o",
                                   str(fx["delta"]), "--overwrite"], "is the input"),
    "delta-apply": (lambda fx: ["delta", "apply", str(fx["dense"]), str(fx["delta"]), "-o",
                                str(fx["dense"]), "--overwrite"], "lies inside the output"),
    "import": (lambda fx: ["import", str(fx["hf"]), "--out", str(fx["hf"]), "--overwrite"],
               "is the input"),
    "export": (lambda fx: ["export", str(fx["run"]), "--out", str(fx["run"]), "--overwrite"],
               "lies inside the output"),
    "grow": (lambda fx: ["grow", str(fx["dense"]), "--ffn-dim", "64", "--out",
                         str(fx["dense"]), "--overwrite"], "lies inside the output"),
    "shrink": (lambda fx: ["shrink", str(fx["dense"]), "--ffn", "0.5", "--out",
                           str(fx["dense"]), "--overwrite"], "lies inside the output"),
    "retokenize": (lambda fx: ["retokenize", str(fx["dense"]), "--vocab-size", "300", "--out",
                               str(fx["dense"]), "--overwrite"], "lies inside the output"),
    "prune": (lambda fx: ["prune", str(fx["dense"]), "--ffn", "0.5", "--out", str(fx["dense"]),
                          "--overwrite"], "lies inside the output"),
    "importance": (lambda fx: ["importance", str(fx["dense"]), "--domains", "text", "--out",
                               str(fx["dense"] / "model.safetensors"), "--overwrite"],
                   "is the input"),
    "init": (lambda fx: ["init", "--from", str(fx["dense"]), "--method", "standard", "--out",
                         str(fx["dense"]), "--overwrite"], "lies inside the output"),
    # an output inside an input directory, and one output named twice
    "import-inside": (lambda fx: ["import", str(fx["hf"]), "--out", str(fx["hf"] / "moe")],
                      "lies inside the input"),
    "generate-twice": (lambda fx: ["generate", str(fx["dense"]), "--json",
                                   str(fx["tmp"] / "g.json"), "--html", str(fx["tmp"] / "g.json")],
                       "is named twice"),
}


@pytest.mark.parametrize("name", SAME)
def test_output_that_is_an_input_is_refused_and_nothing_changes(name, fx, capsys):
    argv_of, expect = SAME[name]
    argv = argv_of(fx)
    before, scratch = snapshot(fx["root"]), snapshot(fx["tmp"])
    capsys.readouterr()
    assert main(argv) == 2
    one_error_line(capsys.readouterr().err, expect)
    assert snapshot(fx["root"]) == before, f"{name} changed its input"
    assert snapshot(fx["tmp"]) == scratch


# command -> (argv writing a new output, the output whose lock another job holds)
def _new(fx, name):
    return fx["tmp"] / name


LOCKED = {
    "train": lambda fx, o: (["train", str(DEBUG / "dense.yaml"), f"out_dir={o}", QUIET], o),
    "run": lambda fx, o: (["run", str(DEBUG / "study.yaml"), f"out_dir={o}", QUIET], o),
    "run-experiment": lambda fx, o: (["run", str(REPO / "recipes" / "init" / "debug.yaml"),
                                      f"out_dir={o}", QUIET], o),
    "sweep": lambda fx, o: (["sweep", str(DEBUG / "study.yaml"), "study.budget_steps=80,160",
                             f"out_dir={o}", QUIET], o),
    "eval": lambda fx, o: (["eval", str(fx["dense"])], fx["dense"] / "eval.json"),
    "eval-json": lambda fx, o: (["eval", str(fx["dense"]), "--json", str(o)], o),
    "generate": lambda fx, o: (["generate", str(fx["dense"]), "--json", str(o)], o),
    "split": lambda fx, o: (["split", str(fx["dense"]), "--experts", "text,code", "--out",
                             str(o)], o),
    "assemble": lambda fx, o: (["assemble", str(fx["dense"]), str(fx["ft"]), "--experts",
                                "text,code", "--out", str(o)], o),
    "merge": lambda fx, o: (["merge", str(fx["merge"]), "--out", str(o)], o),
    "delta-extract": lambda fx, o: (["delta", "extract", str(fx["dense"]), str(fx["ft"]),
                                     "-o", str(o)], o),
    "delta-compress": lambda fx, o: (["delta", "compress", str(fx["delta"]), "topk:0.5", "-o",
                                      str(o)], o),
    "delta-apply": lambda fx, o: (["delta", "apply", str(fx["dense"]), str(fx["delta"]), "-o",
                                   str(o)], o),
    "import": lambda fx, o: (["import", str(fx["hf"]), "--out", str(o)], o),
    "export": lambda fx, o: (["export", str(fx["dense"]), "--out", str(o)], o),
    "grow": lambda fx, o: (["grow", str(fx["dense"]), "--ffn-dim", "64", "--out", str(o)], o),
    "shrink": lambda fx, o: (["shrink", str(fx["dense"]), "--ffn", "0.5", "--out", str(o)], o),
    "retokenize": lambda fx, o: (["retokenize", str(fx["dense"]), "--vocab-size", "300",
                                  "--out", str(o)], o),
    "prune": lambda fx, o: (["prune", str(fx["dense"]), "--ffn", "0.5", "--out", str(o)], o),
    "importance": lambda fx, o: (["importance", str(fx["dense"]), "--domains", "text", "--out",
                                  str(o.with_suffix(".safetensors"))],
                                 o.with_suffix(".safetensors")),
    "init": lambda fx, o: (["init", "--from", str(fx["dense"]), "--method", "standard",
                            "--out", str(o)], o),
}


@pytest.mark.parametrize("name", LOCKED)
def test_second_writer_of_a_held_output_is_refused(name, fx, capsys):
    argv, out = LOCKED[name](fx, _new(fx, name) / "out")
    before, scratch = snapshot(fx["root"]), snapshot(fx["tmp"])
    capsys.readouterr()
    with OutputLock(out):  # another job writing `out`
        assert main(argv) == 2
        one_error_line(capsys.readouterr().err, f"{out} is in use by another job "
                       f"(pid {os.getpid()})")  # fmt: skip
        assert not out.exists()
    assert snapshot(fx["root"]) == before
    assert snapshot(fx["tmp"]) == scratch, "the refused command left something"
    assert not lock_path(out).exists()


def _second_writer_during(monkeypatch, target: str, argv: list[str]) -> list:
    """Patch `target` (the function that renames the output into place) so that while the
    in-process command holds its claim, the same command runs as a second process."""
    import importlib

    mod_name, fn = target.rsplit(".", 1)
    mod = importlib.import_module(mod_name)
    orig, seen = getattr(mod, fn), []

    def hooked(*a, **kw):
        seen.append(subprocess.run([sys.executable, "-m", "moe.cli", *argv], capture_output=True,
                                   text=True, env=ENV, timeout=300))  # fmt: skip
        return orig(*a, **kw)

    monkeypatch.setattr(mod, fn, hooked)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("target,make", [
    ("moe.surgery.experts.save_checkpoint",
     lambda fx, o: ["split", str(fx["dense"]), "--experts", "text,code", "--out", str(o)]),
    ("moe.delta.ops.write_delta",
     lambda fx, o: ["delta", "compress", str(fx["delta"]), "topk:0.5", "-o", str(o)]),
])  # fmt: skip
def test_two_writers_exactly_one_succeeds(target, make, fx, monkeypatch, capsys):
    out = fx["tmp"] / f"two-{target.rsplit('.', 1)[1]}"
    argv = make(fx, out)
    seen = _second_writer_during(monkeypatch, target, argv)
    assert main(argv) == 0  # the first writer
    (second,) = seen
    assert second.returncode == 2, second.stderr[-2000:]
    one_error_line(second.stderr, f"{out} is in use by another job (pid {os.getpid()})")
    assert out.exists() and not lock_path(out).exists()
    capsys.readouterr()
    # and once the first has finished, a second run is an ordinary existing output
    assert main(argv) == 2
    one_error_line(capsys.readouterr().err, "already exists")


# ---------------------------------------------------------------------------- training runs


def test_train_overwrite_on_a_locked_run_keeps_its_logs_and_resume(fx, capsys):
    run = fx["run"]
    before = snapshot(run)
    with OutputLock(run):
        assert main(["train", str(DEBUG / "dense.yaml"), f"out_dir={run}", "--overwrite",
                     QUIET]) == 2  # fmt: skip
        one_error_line(capsys.readouterr().err, "in use by another job")
    assert (run / "logs" / "metrics.csv").is_file() and (run / "resume" / "last.ckpt").is_file()
    assert snapshot(run) == before


@pytest.mark.parametrize("over,expect", [
    (["model.dim=32"], "another architecture"),
    (["model.n_layers=3"], "another architecture"),
    (["trainer.max_steps=1"], "past trainer.max_steps (1)"),
])  # fmt: skip
def test_failed_resume_changes_nothing_and_exits_2(over, expect, fx, capsys):
    run = fx["run"]
    before = snapshot(run)
    argv = ["train", str(DEBUG / "dense.yaml"), f"out_dir={run}", f"resume={run}",
            "trainer.max_steps=4", *over, QUIET]  # fmt: skip
    assert main(argv) == 2
    one_error_line(capsys.readouterr().err, "resume:", expect)
    assert snapshot(run) == before  # recipe.yaml included, byte for byte


@pytest.mark.slow
def test_failed_resume_of_a_real_run(tmp_path, capsys):
    """The same with a run trained by Lightning (its real resume file)."""
    run = tmp_path / "run"
    assert main(["train", str(DEBUG / "dense.yaml"), f"out_dir={run}", "trainer.max_steps=2",
                 "trainer.checkpoint_every_n_steps=1", QUIET]) == 0  # fmt: skip
    before = snapshot(run)
    for over, expect in ((["model.dim=32"], "another architecture"),
                         (["trainer.max_steps=1"], "past trainer.max_steps")):
        capsys.readouterr()
        assert main(["train", str(DEBUG / "dense.yaml"), f"out_dir={run}", f"resume={run}",
                     *over, QUIET]) == 2  # fmt: skip
        one_error_line(capsys.readouterr().err, expect)
        assert snapshot(run) == before


def test_train_refuses_an_init_or_fork_inside_what_it_replaces(fx, capsys):
    run = fx["run"]
    before = snapshot(run)
    assert main(["train", str(DEBUG / "dense.yaml"), f"out_dir={run}", f"fork={run}",
                 f"init={run / 'model'}", "--overwrite", QUIET]) == 2  # fmt: skip
    one_error_line(capsys.readouterr().err, "lies inside the output")
    assert snapshot(run) == before


# ---------------------------------------------------------------------------- the helper


def test_paths_are_compared_resolved_through_links(tmp_path):
    ck = save_tiny(tmp_path / "ck")
    (tmp_path / "alias").symlink_to(ck)
    with pytest.raises(OutputError, match="is the input"):
        check_outputs([tmp_path / "alias" / "meta.json"], [ck])
    os.link(ck / "meta.json", tmp_path / "hard.json")
    with pytest.raises(OutputError, match="is the input"):
        check_outputs([tmp_path / "hard.json"], [ck])
    with pytest.raises(OutputError, match="lies inside the output"):
        check_outputs([tmp_path], [tmp_path / "alias"])
    # beside a checkpoint's own files is allowed (moe eval's eval.json)
    check_outputs([ck / "eval.json"], [ck])


def test_lock_is_beside_the_output_and_removed_after(tmp_path):
    out = tmp_path / "deep" / "out"
    with claim(out, []):
        assert lock_path(out) == tmp_path / "deep" / ".out.lock"
        assert lock_path(out).read_text() == str(os.getpid())
        with pytest.raises(OutputError, match="in use by another job"):
            OutputLock(out).acquire()
        with claim(out, []):  # the same command's own nested claim is free
            pass
    assert not (tmp_path / "deep").exists()  # nothing written: the directory made is removed


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "out"
    code = ("import sys, time; from moe.io.output import OutputLock; "
            f"OutputLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=f"pid {p.pid}"):
            OutputLock(out).acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert lock_path(out).exists()  # left by the killed job, but its flock died with it
    with OutputLock(out):
        pass
    assert not lock_path(out).exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("name", LOCKED)
def test_a_signal_while_writing_leaves_no_output_and_exits_128_plus_signal(
        name, signum, fx, monkeypatch, capsys):
    """The signal arrives just before the first rename of the command's writes (every staged
    write ends in `os.replace`): the command stops with one line and exit 130 / 143, the output
    is not there (for a training run: no model/), no staging file is left, no input changed.
    Training stages defer the signal to the end of the step and leave a resume file instead."""
    argv, out = LOCKED[name](fx, _new(fx, f"sig-{name}-{signum}") / "out")
    out.parent.mkdir(parents=True, exist_ok=True)
    before = snapshot(fx["root"])
    real_replace, sent = os.replace, []

    def replace(src, dst, **kw):
        if not sent:
            sent.append(dst)
            os.kill(os.getpid(), signum)
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "replace", replace)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert sent, f"{name} wrote nothing through a rename"
    assert rc == 128 + signum, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("moe:")]
    assert len(lines) == 1 and lines[0].startswith(
        "moe: interrupted by " + signal.Signals(signum).name), err[-2000:]
    trained = name in ("train", "run", "run-experiment", "sweep")
    assert not (out / "model" if trained else out).exists()
    assert not [p for p in out.parent.rglob("*") if ".tmp-" in p.name], "a staging file was left"
    assert snapshot(fx["root"]) == before
