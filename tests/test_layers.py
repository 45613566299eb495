"""The architecture holds: the unit import graph of `moe` is a DAG whose edges all point down
DESIGN.md's layer list (tools/import_graph.py, function-level imports included), and no source
file is over 600 lines."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools/import_graph.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "moe"
    for name, text in {"__init__.py": "", **files}.items():
        f = pkg / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return pkg


def test_the_unit_graph_is_a_dag_that_points_down_the_layers():
    g = _tool()
    units, edges = g.graph()
    assert not g.cycles(units, edges), g.cycles(units, edges)
    assert not g.upward(edges), [(a, b, edges[(a, b)][:2]) for a, b in g.upward(edges)]
    assert set(units) == set(g.LAYERS), "every unit has its place in LAYERS (and DESIGN.md)"


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    g = _tool()
    pkg = _package(tmp_path, {
        "config/__init__.py": "def f():\n    from ..model import x\n",  # lazy and relative
        "model/__init__.py": "x = 1\n",
        "train/__init__.py": "import moe.eval.thing\n",
        "eval/__init__.py": "", "eval/thing.py": "from moe import config\n",
    })
    units, edges = g.graph(pkg)
    assert set(edges) == {("config", "model"), ("train", "eval"), ("eval", "config")}
    assert g.upward(edges, ("config", "model", "eval", "train")) == [("config", "model")]
    assert g.cycles(units, edges) == []


def test_a_cycle_is_found(tmp_path):
    g = _tool()
    pkg = _package(tmp_path, {
        "a.py": "from moe.b import y\n",
        "b/__init__.py": "def y():\n    import moe.c\n",
        "c.py": "import moe.a\n",
        "d.py": "import moe.a\n",
    })
    units, edges = g.graph(pkg)
    assert g.cycles(units, edges) == [["a", "b", "c"]]


def test_the_tool_exits_nonzero_on_this_repository_only_when_the_layers_break():
    out = subprocess.run([sys.executable, "tools/import_graph.py"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    assert "0 cycle(s)" in out.stdout


def test_no_source_file_is_over_600_lines():
    files = [p for d in ("moe", "kernels", "tools") for p in (ROOT / d).rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files
            if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long
