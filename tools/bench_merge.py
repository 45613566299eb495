"""Peak memory of a streaming merge versus the size of one model.

Builds three random dense checkpoints of one lineage (a base and two fine-tunes, ≥100M parameters
each by default) in a temporary directory, runs a TIES merge in a fresh subprocess and reports that
process's peak resident set size (VmHWM: its own peak, like ru_maxrss without the parent's). The
same process measured right after imports gives the baseline (Python + torch), so
`(peak - baseline) / model size` is the merge's own cost.
With --naive it also measures loading every input at once (what a non-streaming merge holds).

    python tools/bench_merge.py                # ~106M params, fp32 (425 MB per model)
    python tools/bench_merge.py --layers 2     # quick check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moe.config import ModelConfig
from moe.io.checkpoint import make_meta, save_checkpoint
from moe.model.transformer import Transformer

CHILD = r"""
import json, resource, sys, time
import torch
from moe.merge import merge, merge_config_from_dict
from safetensors.torch import load_file

def rss_mb():
    # VmHWM is this process's own peak; ru_maxrss would include the parent's peak from before
    # exec (Linux carries it over), which here holds a whole model
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
baseline = rss_mb()
t0 = time.perf_counter()
if spec["naive"]:
    sds = [load_file(p + "/model.safetensors") for p in [spec["base"]] + spec["models"]]
    # touch every tensor: load_file maps the file, pages count once read
    sum(float(t.sum()) for sd in sds for t in sd.values())
else:
    cfg = merge_config_from_dict({
        "merge_method": "ties", "base_model": spec["base"],
        "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}}
                   for m in spec["models"]],
        "parameters": {"lambda": 1.0},
    })
    merge(cfg, spec["out"], overwrite=True, progress=False)
print(json.dumps({"baseline_mb": baseline, "peak_mb": rss_mb(),
                  "seconds": time.perf_counter() - t0}))
"""


def build(dirpath: Path, cfg: ModelConfig) -> tuple[str, list[str], int]:
    torch.manual_seed(0)
    model = Transformer(cfg)
    n_params = model.num_params()
    base_meta = make_meta(kind="branch", family="code")
    base = save_checkpoint(dirpath / "base", model.state_dict(), cfg, base_meta)
    models = []
    for i in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=1e-3)  # a "fine-tune": small random update
        meta = make_meta(base_id=base_meta["base_id"], family="code", parents=[base_meta["id"]])
        models.append(str(save_checkpoint(dirpath / f"ft{i}", model.state_dict(), cfg, meta)))
    del model
    return str(base), models, n_params


def run_child(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=15, help="base-size layers (15 ≈ 106M params)")
    ap.add_argument("--naive", action="store_true", help="also measure loading all inputs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the merge process")
    ap.add_argument("--tmp", default=None, help="directory for the checkpoints (default: tmp)")
    args = ap.parse_args()
    cfg = ModelConfig(size="base", n_layers=args.layers).resolved()
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        t0 = time.perf_counter()
        base, models, n_params = build(Path(d), cfg)
        model_mb = (Path(base) / "model.safetensors").stat().st_size / 2**20
        print(f"built 3 checkpoints of {n_params / 1e6:.1f}M params "
              f"({model_mb:.0f} MiB each, fp32) in {time.perf_counter() - t0:.0f}s")  # fmt: skip
        spec = {
            "base": base,
            "models": models,
            "out": str(Path(d) / "merged"),
            "naive": False,
            "threads": args.threads,
        }
        r = run_child(spec)
        ck = Path(spec["out"]) / "model.safetensors"
        assert ck.stat().st_size == (Path(base) / "model.safetensors").stat().st_size
        own = r["peak_mb"] - r["baseline_mb"]
        print(f"ties merge of 2 models + base: {r['seconds']:.1f}s, peak RSS {r['peak_mb']:.0f} "
              f"MiB, after imports {r['baseline_mb']:.0f} MiB, merge's own {own:.0f} MiB = "
              f"{own / model_mb:.2f}x one model")  # fmt: skip
        if args.naive:
            n = run_child(spec | {"naive": True})
            own_n = n["peak_mb"] - n["baseline_mb"]
            print(f"loading all 3 inputs at once (no merge yet): {own_n:.0f} MiB = "
                  f"{own_n / model_mb:.2f}x one model")  # fmt: skip


if __name__ == "__main__":
    main()
