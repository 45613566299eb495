"""`moe run --jobs N`: seeds (or one seed's training stages) in parallel processes give the
sequential results; mistakes are one line; a worker's ConfigError comes back as one line; a
Ctrl-C stops every worker at a resumable point and leaves no process behind."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import DEBUG

from moe.cli import main
from moe.experiments.study.arms import StageSpec
from moe.experiments.study.parallel import _Prefixed, _width
from moe.io.output import OutputLock

QUIET = "trainer.enable_progress_bar=false"
TINY = [str(DEBUG / "study.yaml"), "study.budget_steps=12", "study.arms=[seed,monolith]",
        "study.eval_batches=1", QUIET]


def _bpb(out) -> dict:
    res = json.loads((out / "results.json").read_text())
    return {(m, d): v["mean"] for m, r in res["models"].items() for d, v in r["bpb"].items()}


def test_seeds_in_two_processes_give_the_sequential_results(tmp_path, capfd):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["run", *TINY, f"out_dir={one}", "--seeds", "2"]) == 0
    capfd.readouterr()
    assert main(["run", *TINY, f"out_dir={two}", "--seeds", "2", "--jobs", "2"]) == 0
    err = capfd.readouterr().err  # the workers' own stderr too
    a, b = _bpb(one), _bpb(two)
    assert a.keys() == b.keys() and len(a) == 6  # seed, dense-compute x 3 domains
    for k in a:
        assert b[k] == pytest.approx(a[k], abs=1e-6), k
    for seed in (1234, 1235):  # each seed's own results, as without --jobs
        x = json.loads((one / f"seed-{seed}" / "results.json").read_text())
        y = json.loads((two / f"seed-{seed}" / "results.json").read_text())
        assert x["command"] == y["command"]
        assert {m: r["eval"] for m, r in x["models"].items()} == {
            m: r["eval"] for m, r in y["models"].items()}
    # every line a worker printed names its seed
    assert "[seed 1234] [1/4] seed (train" in err and "[seed 1235] [3/4] eval" in err
    assert not [ln for ln in err.splitlines() if ln.startswith("[1/4]")]


def test_a_workers_config_error_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    # another job holds seed 1235's first stage: that worker's training refuses it
    with OutputLock(out / "seed-1235" / "stages" / "seed"):
        rc = main(["run", *TINY, f"out_dir={out}", "--seeds", "2", "--jobs", "2"])
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("moe:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "seed-1235/stages/seed is in use by another job" in lines[0]
    assert not (out / "results.json").exists()


@pytest.mark.parametrize("cmd,extra,msg", [
    ("run", ["--jobs", "0"], "--jobs must be at least 1, got 0"),
    ("run", ["--jobs=-3", "--dry-run"], "--jobs must be at least 1, got -3"),
    ("run", ["--jobs", "2", "--stage", "seed"], "--stage runs one stage in this process"),
    ("sweep", ["--jobs", "0", "study.budget_steps=12,16"], "--jobs must be at least 1, got 0"),
])
def test_bad_jobs_is_one_line_and_writes_nothing(tmp_path, capsys, cmd, extra, msg):
    out = tmp_path / "run"
    assert main([cmd, *TINY, f"out_dir={out}", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe: error: ") and msg in err and len(err.splitlines()) == 1, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_dry_run_takes_jobs(capsys):
    assert main(["run", *TINY, "--jobs", "2", "--dry-run"]) == 0
    assert "dense-compute" in capsys.readouterr().out


def test_stage_width_counts_the_training_stages_that_need_not_wait():
    def st(name, deps=(), kind="train"):
        return StageSpec(name=name, kind=kind, deps=tuple(deps), run=lambda: None)

    chain = [st("seed"), st("dense", ["seed"])]
    assert _width(chain) == 1
    branches = [st("seed"), *(st(f"b-{d}", ["seed"]) for d in "abc"), st("moe", ["b-a"])]
    assert _width(branches) == 3
    # independent, though at different depths (a merge between)
    skew = [st("seed"), st("x", ["seed"]), st("m", ["seed"], kind="merge"), st("y", ["m"])]
    assert _width(skew) == 2


def test_worker_lines_are_prefixed():
    class Sink:
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    sink = Sink()
    out = _Prefixed(sink)
    out.prefix = "[seed 7] "
    out.write("one\ntw")
    out.write("o\n\nthree")
    assert sink.text == "[seed 7] one\n[seed 7] two\n"
    out.flush()
    assert sink.text.endswith("[seed 7] three\n")


@pytest.mark.slow
def test_stages_in_two_processes_give_the_sequential_results(tmp_path):
    args = [str(DEBUG / "study.yaml"), "study.budget_steps=24", "study.eval_batches=1", QUIET,
            "study.arms=[seed,branches,family,btx,monolith]", "study.finetune_steps=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["run", *args, f"out_dir={one}"]) == 0
    assert main(["run", *args, f"out_dir={two}", "--jobs", "2"]) == 0
    a, b = (json.loads((d / "results.json").read_text())["models"] for d in (one, two))
    assert a.keys() == b.keys()
    for m in a:
        for d, v in a[m]["eval"].items():
            assert b[m]["eval"][d]["bpb"] == pytest.approx(v["bpb"], abs=1e-6), (m, d)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    return [int(p) for p, pp in (ln.split() for ln in out.splitlines()) if int(pp) == pid]


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_at_a_resumable_point(tmp_path):
    out = tmp_path / "run"
    args = [str(DEBUG / "study.yaml"), f"out_dir={out}", "study.budget_steps=400",
            "study.arms=[seed,monolith]", "study.eval_batches=1", QUIET, "--seeds", "2"]
    p = subprocess.Popen([sys.executable, "-m", "moe.cli", "run", *args, "--jobs", "2"],
                         stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    ckpts = [out / f"seed-{s}" / "stages" / "seed" / "resume" / "last.ckpt" for s in (1234, 1235)]
    deadline = time.time() + 300
    while not all(c.exists() for c in ckpts) and p.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert p.poll() is None, p.stderr.read()[-3000:]
    workers = _children(p.pid)
    p.send_signal(signal.SIGINT)  # the parent alone (the workers have their own group)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("moe:")]
    assert len(lines) == 1 and "resume with: moe run" in lines[0], err[-3000:]
    for s in (1234, 1235):
        assert f"[seed {s}] stopped: interrupted by SIGINT" in err, err[-3000:]
    time.sleep(0.5)
    for w in workers:  # no worker left behind
        assert not os.path.exists(f"/proc/{w}") or "zombie" in open(f"/proc/{w}/status").read()
