"""Run directories: refuse to clobber, one writer at a time, atomic Lightning resume files.

Layout of a training run directory:
    recipe.yaml      the resolved recipe
    model/           the final checkpoint (see moe.io.checkpoint)
    resume/last.ckpt Lightning's resume file (written atomically, loaded with weights_only)
    logs/            CSV metrics (metrics.csv) and the recipe as hparams.yaml
    tensorboard/, wandb/, mlflow/  the trainer.logger tracker's files (moe/train/tracking.py),
                     when trainer.logger_dir is unset
A job writing the run holds `../.NAME.lock` (moe.io.output.claim), taken before anything in
the directory is touched.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from moe.config import ConfigError
from moe.io.checkpoint import staged_file
from moe.io.output import OutputLock


class RunDirError(ConfigError):
    pass


# one writer per run directory: the lock every writing command takes (moe/io/output.py), on
# `.NAME.lock` beside the run directory
RunLock = OutputLock


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


def check_run_dir(out_dir: str | os.PathLike, overwrite: bool, resume: bool) -> bool:
    """Refuse a run into `out_dir` that is neither new, an --overwrite nor a resume (reads only).
    Returns whether the directory holds an earlier run."""
    run = Path(out_dir)
    if run.exists() and not run.is_dir():
        raise RunDirError(f"out_dir {run} exists and is not a directory")
    used = run.exists() and any(p.name != ".lock" for p in run.iterdir())
    if used and not (overwrite or resume):
        raise RunDirError(
            f"output directory {run} already exists; pass --overwrite to replace it "
            "or resume=... to continue it"
        )
    return used


def prepare_run_dir(out_dir: str | os.PathLike, overwrite: bool, resume: bool) -> Path:
    """Check that a run may write to `out_dir`, and create it. Clears old logs/resume files only
    on overwrite: call it when every other check has passed (and the run's claim is held)."""
    run = Path(out_dir)
    used = check_run_dir(run, overwrite, resume)
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


def check_resume_model(path: Path, model: torch.nn.Module, what: str = "resume") -> None:
    """Refuse a Lightning checkpoint whose model weights are not `model`'s (names and shapes)
    before anything is written: Lightning itself finds out only inside fit."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not the zip layout mmap needs (read_resume_state read it already)
        ck = torch.load(path, map_location="cpu", weights_only=True)
    saved = {k.removeprefix("model."): tuple(v.shape)
             for k, v in (ck.get("state_dict") or {}).items() if k.startswith("model.")}
    if not saved:
        return  # a layout without the module's own keys: Lightning checks it
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if saved == want:
        return
    name = next((k for k in want if k not in saved), None)
    if name is not None:
        detail = f"it has no {name}"
    else:
        name = next((k for k in saved if k not in want), None)
        if name is not None:
            detail = f"it has {name}, which this recipe's model does not"
        else:
            name = next(k for k in want if saved[k] != want[k])
            detail = f"{name} is {list(saved[name])} there, {list(want[name])} here"
    raise RunDirError(f"{what}: {path} holds a model of another architecture ({detail}); "
                      "resume a run with the recipe it was started with")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary name then renamed; loaded with weights_only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with staged_file(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
