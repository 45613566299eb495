"""Run directories: refuse to clobber, one writer at a time, atomic Lightning resume files.

Layout of a training run directory:
    recipe.yaml      the resolved recipe
    model/           the final checkpoint (see moe.io.checkpoint)
    resume/last.ckpt Lightning's resume file (written atomically, loaded with weights_only)
    logs/            CSV metrics (and TensorBoard events when installed)
    .lock            held (flock) while a job writes here
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from moe.config import ConfigError


class RunDirError(ConfigError):
    pass


class RunLock:
    """An exclusive advisory lock on `dir/.lock`; a second job on the same directory is refused."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise RunDirError(
                f"{self.path.parent} is in use by another job (pid {holder}); "
                "wait for it or choose another out_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


_RANK_VARS = ("RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK", "SLURM_PROCID")


def launch_rank_is_zero() -> bool:
    """Whether this process is (or will be) global rank 0 of a multi-process launch.

    Decided from the environment before any process group exists: Lightning's `ddp` launcher
    re-runs the command for ranks 1.. with LOCAL_RANK/NODE_RANK/WORLD_SIZE set, torchrun sets
    RANK, SLURM sets SLURM_PROCID. A process with none of them set is a single process or the
    launching one (rank 0). Only rank 0 prepares, locks and writes the run directory.
    """
    for var in _RANK_VARS:
        value = os.environ.get(var, "").strip()
        if value and value != "0":
            return False
    return True


def prepare_run_dir(out_dir: str | os.PathLike, overwrite: bool, resume: bool) -> Path:
    """Check that a run may write to `out_dir`. Clears old logs/resume files only on overwrite."""
    run = Path(out_dir)
    if run.exists() and not run.is_dir():
        raise RunDirError(f"out_dir {run} exists and is not a directory")
    used = run.exists() and any(p.name != ".lock" for p in run.iterdir())
    if used and not (overwrite or resume):
        raise RunDirError(
            f"output directory {run} already exists; pass --overwrite to replace it "
            "or resume=... to continue it"
        )
    run.mkdir(parents=True, exist_ok=True)
    if used and overwrite and not resume:
        # the final model is replaced atomically when the new one is complete; logs and
        # resume state of the old run would only confuse the new one
        for sub in ("resume", "logs"):
            shutil.rmtree(run / sub, ignore_errors=True)
    return run


def find_resume_ckpt(resume: str | os.PathLike) -> Path:
    p = Path(resume)
    if p.is_dir():
        p = p / "resume" / "last.ckpt" if (p / "resume").is_dir() else p / "last.ckpt"
    if not p.is_file():
        raise RunDirError(f"resume: no Lightning checkpoint at {p}")
    return p


def read_resume_step(path: Path) -> int:
    """The global step stored in a Lightning checkpoint (loaded without unpickling code)."""
    return read_resume_state(path)[0]


def read_resume_state(path: Path) -> tuple[int, dict]:
    """(global step, moe-forge counters) of a Lightning checkpoint, loaded with weights_only."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad magic, or an object weights_only refuses
        text = str(e).strip()
        if "Weights only load failed" in text:
            why = "it holds pickled Python objects; resume files are loaded with weights_only"
        else:
            first = text.splitlines()[0] if text else type(e).__name__
            # torch's messages carry terminal escapes and advice; the first sentence says it
            why = re.sub(r"\x1b\[[0-9;]*m", "", first).split(". ")[0][:160]
        raise RunDirError(f"resume: {path} is not a readable checkpoint ({why})") from None
    if not isinstance(ck, dict) or "global_step" not in ck:
        raise RunDirError(f"resume: {path} is not a Lightning checkpoint (no global_step)")
    state = ck.get("moe_forge")
    return int(ck["global_step"]), dict(state) if isinstance(state, dict) else {}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary name then renamed; loaded with weights_only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
