"""Kill and resume: a job killed with SIGKILL at a random point resumes to the same weights."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import DEBUG

from moe.io.checkpoint import load_checkpoint

pytestmark = pytest.mark.reliability

STEPS = 96  # long enough that a kill lands mid-run on a fast idle machine too
COMMON = [str(DEBUG / "dense.yaml"), f"trainer.max_steps={STEPS}", "trainer.val_check_interval=8",
          "trainer.checkpoint_every_n_steps=4", "trainer.enable_progress_bar=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def moe(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "moe.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, **kw)


def kill_midway(out, rng) -> int:
    """Start training, SIGKILL it after a random resume point exists; the step it was at."""
    last = out / "resume" / "last.ckpt"
    for _ in range(5):
        p = moe("train", *COMMON, f"out_dir={out}", "--overwrite")
        deadline = time.time() + 300
        while not last.exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            step = torch.load(last, weights_only=True)["global_step"]
            if step < STEPS:
                return step
        p.wait()
    pytest.skip("training finished before it could be killed five times")


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    ref = tmp_path / "ref"
    p = moe("train", *COMMON, f"out_dir={ref}")
    assert p.wait() == 0, p.stderr.read().decode()[-2000:]
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    out = tmp_path / "killed"
    step = kill_midway(out, rng)
    assert 0 < step < STEPS
    assert not (out / "model").exists()
    p = moe("train", *COMMON, f"out_dir={out}", f"resume={out}")
    assert p.wait() == 0, p.stderr.read().decode()[-2000:]
    a = load_checkpoint(ref / "model")
    b = load_checkpoint(out / "model")
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), f"{k} differs after resume at {step}"
    assert a.meta["tokens_seen"] == b.meta["tokens_seen"]


# ---------------------------------------------------------------------------- moe run


def _study_ids(out) -> dict:
    from moe.io.checkpoint import is_checkpoint, read_meta

    stages = out / "stages"
    return {d.name: read_meta(d / "model")["id"] for d in sorted(stages.iterdir())
            if is_checkpoint(d / "model")} if stages.is_dir() else {}


def _run_until(out, banner: str | None, delay: float = 0.0):
    """`moe run` on the debug study; SIGKILL it `delay` s after stderr shows `banner` (or once
    stages/branch-text/model exists, for the first kill). Returns (returncode, stderr)."""
    import re
    import threading

    p = moe("run", DEBUG / "study.yaml", f"out_dir={out}", "trainer.enable_progress_bar=false")
    lines: list[str] = []
    seen = threading.Event()
    pat = re.compile(rf"^\[\d+/\d+\] {re.escape(banner)} \(") if banner else None

    def pump():
        for raw in p.stderr:
            line = raw.decode(errors="replace")
            lines.append(line)
            if pat is not None and pat.search(line):
                seen.set()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    if banner is not None:
        deadline = time.time() + 900
        while not seen.is_set() and p.poll() is None and time.time() < deadline:
            if banner == "branch-code" and (out / "stages" / "branch-text" / "model").is_dir():
                seen.set()
            time.sleep(0.02)
        assert seen.is_set(), "".join(lines)[-3000:]
        time.sleep(delay)
        assert p.poll() is None, "the study ended before it could be killed"
        p.send_signal(signal.SIGKILL)
    rc = p.wait(timeout=1800)
    t.join(timeout=10)
    return rc, "".join(lines)


@pytest.mark.slow
def test_moe_run_killed_mid_stage_resumes_without_redoing_finished_stages(tmp_path):
    out = tmp_path / "study"
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    # kill 1: as the second branch starts; kill 2: somewhere inside the data-matched monolith,
    # a later and longer stage (forked stages are short: a longer first delay could pass it)
    rc, err = _run_until(out, "branch-code", delay=rng.uniform(0.0, 0.5))
    assert rc == -signal.SIGKILL
    first = _study_ids(out)
    assert {"seed", "branch-text"} <= set(first), (first, err[-2000:])
    assert not (out / "report.md").exists()

    rc, err = _run_until(out, "dense-data", delay=rng.uniform(0.0, 0.5))
    assert rc == -signal.SIGKILL
    for name in first:
        assert f"] {name}: done, kept" in err, err[-3000:]
    second = _study_ids(out)
    assert {k: second[k] for k in first} == first
    assert not (out / "report.md").exists()

    rc, err = _run_until(out, None)
    assert rc == 0, err[-3000:]
    for name in second:
        assert f"] {name}: done, kept" in err, err[-3000:]
    final = _study_ids(out)
    assert {k: final[k] for k in second} == second, "a finished stage was redone"
    assert "dense-data" in final and (out / "report.md").is_file()
    assert (out / "results.json").is_file()


def test_resume_keeps_the_metrics_logged_before_it(tmp_path):
    """Lightning's CSV writer deletes an existing metrics.csv when it opens: a resumed run would
    keep only the steps after its resume point. The rows before it are kept, each step once."""
    import csv

    from moe.cli import main

    out = tmp_path / "run"
    common = [str(DEBUG / "dense.yaml"), f"out_dir={out}", "trainer.enable_progress_bar=false",
              "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=2",
              "optim.total_steps=8"]
    assert main(["train", *common, "trainer.max_steps=4"]) == 0
    assert main(["train", *common, "trainer.max_steps=8", f"resume={out}"]) == 0
    with open(out / "logs" / "metrics.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["train/loss"]]
    assert steps == list(range(8))
