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

STEPS = 24
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
