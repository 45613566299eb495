"""Paths and loaders shared by tests (tests/ is on sys.path under pytest's default import mode)."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEBUG = REPO / "recipes" / "debug"


def load_tool(name: str):
    """The script tools/<name>.py as a module (tools/ is not a package), loaded once."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # before exec: dataclasses look their module up
        spec.loader.exec_module(mod)
    return sys.modules[name]
