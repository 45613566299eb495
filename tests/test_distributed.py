"""Two CPU processes (gloo) train the debug recipe, launched the way a user launches them.

`moe train ... trainer.devices=2 trainer.strategy=ddp`: Lightning re-runs the command for rank 1
(LOCAL_RANK=1), which must leave the run directory to rank 0. The ledger counts both ranks, the
ranks draw different batches (rank r takes batches r, r + 2, ... of the one stream), and a resume,
here under `ddp_spawn`, continues the same stream.
"""

import json
import os
import subprocess
import sys

from helpers import DEBUG, REPO

from moe.config import load_recipe
from moe.data.datamodule import DomainDataModule
from moe.model.flops import train_flops_per_token

WORLD = 2
STEPS, MORE = 3, 6


def _overrides(tmp) -> list[str]:
    # corpora built once and cached for every process; smaller than the debug recipe's
    return [f"data.cache_dir={tmp / 'cache'}", "data.bytes_per_domain=40000"]


def _train(out, steps: int, strategy: str, *extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "SLURM_PROCID")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "moe.cli", "train", str(DEBUG / "dense.yaml"),
           "trainer.accelerator=cpu", f"trainer.devices={WORLD}", f"trainer.strategy={strategy}",
           f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false",
           "trainer.limit_val_batches=1", f"out_dir={out}", *_overrides(out.parent), *extra]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads((out / "model" / "meta.json").read_text())


def _tokens_by_domain(batches, names: list[str], indices) -> dict[str, int]:
    """Target tokens per domain in batches `indices` of the training stream."""
    out: dict[str, int] = {}
    for i in indices:
        b = batches.batch(i)
        per_row = (b["targets"] != -100).sum(dim=1)
        for d, n in zip(b["domain"].tolist(), per_row.tolist()):
            out[names[d]] = out.get(names[d], 0) + n
    return dict(sorted(out.items()))



def test_ddp_two_cpu_processes_ledger_batches_and_resume(tmp_path):
    r = load_recipe(DEBUG / "dense.yaml", _overrides(tmp_path))
    dm = DomainDataModule(r.data, seed=r.seed)
    stream = dm.train_batches()
    names = dm.domain_names
    out = tmp_path / "ddp"

    meta = _train(out, STEPS, "ddp")
    st = meta["stage"]
    per_rank = STEPS * r.data.batch_size * r.data.seq_len  # every packed target is real
    assert st["steps"] == STEPS
    assert st["tokens"] == meta["tokens_seen"] == WORLD * per_rank
    assert meta["train_flops"] == st["tokens"] * train_flops_per_token(r.model, r.data.seq_len)
    # both ranks' batches: 0 .. WORLD*STEPS-1 of the stream, not the same STEPS batches twice
    dealt = _tokens_by_domain(stream, names, range(WORLD * STEPS))
    same_twice = {k: WORLD * v for k, v in _tokens_by_domain(stream, names, range(STEPS)).items()}
    assert dealt != same_twice  # the check below can tell the two apart
    assert st["tokens_by_domain"] == dealt
    assert (out / "recipe.yaml").is_file() and (out / "resume" / "last.ckpt").is_file()

    # resume the same run to MORE steps, now under ddp_spawn (its workers send back weights only)
    meta = _train(out, MORE, "ddp_spawn", f"resume={out}")
    st = meta["stage"]
    assert st["steps"] == MORE and st["first_step"] == 0
    assert st["tokens"] == meta["tokens_seen"] == WORLD * MORE * r.data.batch_size * r.data.seq_len
    assert st["tokens_by_domain"] == _tokens_by_domain(stream, names, range(WORLD * MORE))
