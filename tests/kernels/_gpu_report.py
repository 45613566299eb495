"""tools/gpu_compile_report.py as a module, for the tests (tools/ is not a package)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_tool():
    name = "gpu_compile_report"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # before exec: its dataclasses look their module up
        spec.loader.exec_module(mod)
    return sys.modules[name]
