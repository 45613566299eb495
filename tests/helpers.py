"""Paths shared by tests (tests/ is on sys.path under pytest's default import mode)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEBUG = REPO / "recipes" / "debug"
