"""Runs _interp_cases.py (every triton kernel against its torch reference) in a subprocess
under TRITON_INTERPRET=1: the variable must be set before triton is imported, and a bad
memory access in the interpreter can kill the process, which must not take pytest with it."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = pathlib.Path(__file__).parent


def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", str(HERE / "_interp_cases.py"), "-q", "-x",
           "-p", "no:cacheprovider", "-o", "addopts="]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                         cwd=HERE.parent.parent)
    tail = (out.stdout + out.stderr)[-6000:]
    assert out.returncode == 0, tail
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1], tail
