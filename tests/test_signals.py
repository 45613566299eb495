"""SIGTERM and SIGINT: training stops at a step end with a resume file, one line, exit 143/130.

A scheduler's SIGTERM and a user's Ctrl-C must not read as success (exit 0), print a traceback,
write a model, or lose the steps done: the run resumes, with the command the line prints, to the
same weights as a run never interrupted. Outside training a signal is one line and 128 + N too.
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import DEBUG

from moe import cli
from moe.io.checkpoint import load_checkpoint
from moe.train import signals
from moe.train.signals import Interrupted

pytestmark = pytest.mark.reliability

STEPS = 96  # the first resume file is written at step 4: the rest leaves time for the signal
COMMON = [str(DEBUG / "dense.yaml"), f"trainer.max_steps={STEPS}", "trainer.val_check_interval=8",
          "trainer.checkpoint_every_n_steps=4", "trainer.enable_progress_bar=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def moe(*args):
    return subprocess.Popen([sys.executable, "-m", "moe.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)


def interrupt(args, resume_file, signum) -> tuple[int, str]:
    """Run `moe ARGS`, send `signum` once `resume_file` exists (some steps are done and more
    remain); (exit code, stderr)."""
    p = moe(*args)
    deadline = time.time() + 600  # a loaded machine
    while not resume_file.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, p.stderr.read().decode()[-3000:]
    p.send_signal(signum)
    _, err = p.communicate(timeout=600)
    return p.returncode, err.decode(errors="replace")


def check_interrupted(rc, err, signum, run) -> tuple[int, list[str]]:
    """One `moe:` line naming the signal and the step, exit 128 + N, no traceback, no model, the
    resume file at that step (and no temporary beside it). (step, the resume command's words)."""
    assert rc == 128 + signum, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("moe:")]
    assert len(lines) == 1, err[-3000:]
    name = signal.Signals(signum).name
    m = re.fullmatch(rf"moe: interrupted by {name} at step (\d+); resume with: (.+)", lines[0])
    assert m, lines[0]
    step = int(m.group(1))
    assert 4 <= step < STEPS
    assert not (run / "model").exists()
    assert sorted(p.name for p in (run / "resume").iterdir()) == ["last.ckpt"]
    assert torch.load(run / "resume" / "last.ckpt", weights_only=True)["global_step"] == step
    words = shlex.split(m.group(2))
    assert words[0] == "moe" and "--overwrite" not in words
    return step, words[1:]


def resume_with(words) -> None:
    p = moe(*words)
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err.decode()[-3000:]


def assert_same_weights(a_dir, b_dir, why: str) -> None:
    a, b = load_checkpoint(a_dir), load_checkpoint(b_dir)
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), f"{k} differs {why}"
    assert a.meta["tokens_seen"] == b.meta["tokens_seen"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run, never interrupted."""
    out = tmp_path_factory.mktemp("signals") / "ref"
    p = moe("train", *COMMON, f"out_dir={out}")
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err.decode()[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_train_saves_then_resume_is_bit_identical(tmp_path, reference, signum):
    out = tmp_path / "run"
    rc, err = interrupt(["train", *COMMON, f"out_dir={out}"], out / "resume" / "last.ckpt", signum)
    step, words = check_interrupted(rc, err, signum, out)
    assert words[:2] == ["train", str(DEBUG / "dense.yaml")] and words[-1] == f"resume={out}"
    resume_with(words)  # the command the line printed
    assert_same_weights(reference / "model", out / "model", f"after {signum.name} at step {step}")
    meta = load_checkpoint(out / "model").meta
    assert meta["stage"]["first_step"] == 0 and meta["stage"]["steps"] == STEPS


@pytest.mark.slow
def test_sigterm_during_shrink_healing_resumes_by_running_it_again(tmp_path, reference):
    """A command that trains inside (`moe shrink --heal-steps`) says to run it again."""
    out = tmp_path / "shrunk"
    args = ["shrink", reference, "--out", out, "--drop-layers", "1", "--heal-steps", STEPS,
            "trainer.checkpoint_every_n_steps=4", "trainer.enable_progress_bar=false"]
    rc, err = interrupt(args, out / "resume" / "last.ckpt", signal.SIGTERM)
    _, words = check_interrupted(rc, err, signal.SIGTERM, out)
    assert words == [str(a) for a in args]
    resume_with(words)
    assert load_checkpoint(out / "model").meta["stage"]["steps"] == STEPS


# ------------------------------------------------------------------ in-process, no training


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_outside_training_is_one_line_and_128_plus_n(monkeypatch, capsys, signum):
    before = {s: signal.getsignal(s) for s in signals.SIGNALS}

    def evaluate(args):
        signal.raise_signal(signum)
        pytest.fail("the signal did not stop the command")

    monkeypatch.setattr(cli, "cmd_eval", evaluate)
    assert cli.main(["eval", "some-checkpoint"]) == 128 + signum
    err = capsys.readouterr().err
    assert err == f"moe: interrupted by {signum.name}\n"
    assert {s: signal.getsignal(s) for s in signals.SIGNALS} == before  # put back


def test_training_holds_the_first_signal_a_second_stops_at_once(tmp_path):
    with pytest.raises(Interrupted) as e:
        with signals.deferred(tmp_path):
            signal.raise_signal(signal.SIGINT)
            assert signals.pending() == signal.SIGINT  # held for the end of the step
            signal.raise_signal(signal.SIGTERM)
            pytest.fail("a second signal did not stop at once")
    assert (e.value.signum, e.value.step, e.value.run) == (signal.SIGTERM, None, tmp_path)
    assert e.value.exit_code == 143 and signals.pending() is None


def test_a_signal_held_past_the_last_step_is_raised_and_later_ones_ignored(tmp_path):
    with signals.handled():
        with pytest.raises(Interrupted) as e:
            with signals.deferred(tmp_path):
                signal.raise_signal(signal.SIGINT)
        assert (e.value.signum, e.value.run, e.value.exit_code) == (signal.SIGINT, tmp_path, 130)
        signal.raise_signal(signal.SIGTERM)  # on the way out: ignored, nothing raised


def test_an_error_after_a_held_signal_reports_the_signal(tmp_path):
    """A DataLoader worker the signal ended makes the next fetch fail: that is the signal."""
    with pytest.raises(Interrupted) as e:
        with signals.deferred(tmp_path):
            signal.raise_signal(signal.SIGTERM)
            raise RuntimeError("DataLoader worker (pid 1234) exited unexpectedly")
    assert e.value.signum == signal.SIGTERM and isinstance(e.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError):  # and without a signal, an error stays an error
        with signals.deferred(tmp_path):
            raise RuntimeError("boom")
