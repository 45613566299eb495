"""tools/bench_kernels.py runs end to end on a tiny CPU shape and prints its table."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_bench_kernels_tiny_cpu():
    cmd = [sys.executable, str(ROOT / "tools" / "bench_kernels.py"), "--device", "cpu",
           "--shapes", "64,40,24,5,2", "--repeats", "1", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    for needle in ("floor(dense)", "| torch |", "| loop |", "| torch-unchunked |", "| gemms-only |",
                   "routing=skewed", "fwd / floor"):
        assert needle in out.stdout, out.stdout
