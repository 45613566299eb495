"""Integrity, untrusted resume files, one writer per directory, non-finite losses."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import DEBUG

import moe.train.module as module
from moe.cli import main
from moe.io.checkpoint import load_checkpoint, read_meta
from moe.io.rundir import AtomicCheckpointIO, RunDirError, RunLock, read_resume_step

pytestmark = pytest.mark.reliability

QUIET = "trainer.enable_progress_bar=false"


def one_error_line(err: str, *needles: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "no message"
    line = lines[-1]
    assert line.startswith("moe: error: "), err[-2000:]
    assert [ln for ln in lines if ln.startswith("moe:")] == [line]
    for n in needles:
        assert n in line, line
    return line


# ---------------------------------------------------------------------------- sha256


def test_one_flipped_byte_is_refused_by_eval_split_and_train(debug_dense, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(debug_dense / "model", ck)
    w = ck / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    commands = [
        ["eval", str(ck), "--max-docs", "1"],
        ["split", str(ck), "--experts", "text,code", "--out", str(tmp_path / "split")],
        ["train", str(DEBUG / "dense.yaml"), f"init={ck}", f"out_dir={tmp_path / 'run'}",
         "trainer.max_steps=1", QUIET],
    ]
    for argv in commands:
        capsys.readouterr()
        assert main(argv) == 2, argv
        line = one_error_line(capsys.readouterr().err, "model.safetensors", "sha256 mismatch")
        assert str(w) in line
    assert not (tmp_path / "split").exists()
    assert not (tmp_path / "run" / "model").exists()
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before  # no eval.json either


# ---------------------------------------------------------------------------- no unpickling


class Payload:
    """Unpickling this calls Path.touch(marker): the side effect a hostile resume file would do."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def hostile_ckpt(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil" / "last.ckpt"
    path.parent.mkdir()
    torch.save({"global_step": 1, "state_dict": {}, "x": Payload(marker)}, path)
    assert not marker.exists()
    return path, marker


def test_resume_file_with_pickled_object_is_refused(hostile_ckpt, tmp_path, capsys):
    path, marker = hostile_ckpt
    out = tmp_path / "run"
    rc = main(["train", str(DEBUG / "dense.yaml"), f"resume={path}", f"out_dir={out}",
               "trainer.max_steps=2", QUIET])
    assert rc == 2
    one_error_line(capsys.readouterr().err, "resume:", str(path), "pickled Python objects")
    assert not marker.exists(), "the resume file was unpickled"
    with pytest.raises(RunDirError):
        read_resume_step(path)
    with pytest.raises(Exception):  # noqa: B017 - torch's UnpicklingError, any refusal will do
        AtomicCheckpointIO().load_checkpoint(path)
    assert not marker.exists(), "the resume file was unpickled"
    assert not (out / "model").exists()
    # the payload is real: an unrestricted load would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------------------- one writer


def test_second_train_on_a_locked_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        p = subprocess.run(
            [sys.executable, "-m", "moe.cli", "train", str(DEBUG / "dense.yaml"),
             f"out_dir={out}", "trainer.max_steps=1", QUIET],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=600)
        assert p.returncode == 2, p.stderr[-2000:]
        one_error_line(p.stderr, "in use by another job", str(os.getpid()))
    assert not out.exists()  # the lock is `.run.lock` beside it: nothing was created


def test_second_study_on_a_locked_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "study"
    with RunLock(out):
        rc = main(["run", str(DEBUG / "study.yaml"), f"out_dir={out}", QUIET])
        assert rc == 2
        one_error_line(capsys.readouterr().err, "in use by another job")
        # and a single stage of it
        assert main(["run", str(DEBUG / "study.yaml"), f"out_dir={out}", QUIET,
                     "--stage", "seed"]) == 2
        one_error_line(capsys.readouterr().err, "in use by another job")
    assert not out.exists()


# ---------------------------------------------------------------------------- NaN / inf loss


@pytest.fixture
def nan_at_step_3(monkeypatch):
    """The first training batch at global step 3 gets NaN per-token losses (once: a skipped
    step does not advance global_step)."""
    orig = module.LitLM.forward
    fired = []

    def forward(self, batch):
        loss_sum, loss_BT, mask_BT, out = orig(self, batch)
        if self.training and self.global_step == 3 and not fired:
            fired.append(True)
            loss_sum, loss_BT = loss_sum * float("nan"), loss_BT * float("nan")
        return loss_sum, loss_BT, mask_BT, out

    monkeypatch.setattr(module.LitLM, "forward", forward)


def _nan_run(out, policy):
    return main(["train", str(DEBUG / "dense.yaml"), f"out_dir={out}", "trainer.max_steps=6",
                 "trainer.checkpoint_every_n_steps=2", "trainer.val_check_interval=6",
                 f"trainer.nan_policy={policy}", QUIET])


def test_nan_loss_stops_with_step_and_domains_and_keeps_last_good(nan_at_step_3, tmp_path,
                                                                   capsys):
    out = tmp_path / "run"
    assert _nan_run(out, "stop") == 1
    line = one_error_line(capsys.readouterr().err, "step 3", "non-finite loss")
    for dom in ("text", "code", "dna"):
        assert dom in line.split("domain(s)")[1]
    assert not (out / "model").exists()
    last = out / "resume" / "last.ckpt"
    ck = torch.load(last, map_location="cpu", weights_only=True)
    assert 0 < ck["global_step"] <= 3
    for k, v in ck["state_dict"].items():
        assert torch.isfinite(v).all(), k


def test_nan_loss_skipped_by_policy(nan_at_step_3, tmp_path):
    out = tmp_path / "run"
    assert _nan_run(out, "skip") == 0
    meta = read_meta(out / "model")
    assert meta["stage"]["skipped_steps"] == 1
    assert meta["stage"]["steps"] == 6
    for k, v in load_checkpoint(out / "model").state_dict.items():
        assert torch.isfinite(v).all(), k
    # the skipped batch counts as a step of the schedule but its tokens were not trained on
    assert meta["tokens_seen"] == (6 - 1) * 8 * 64
