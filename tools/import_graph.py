"""The unit import graph of the `moe` package, function-level imports included.

A *unit* is a direct child of `moe/`: a subpackage (`moe/eval/`) or a module directly under it.
An edge A -> B means some file of A imports something of B, at module level or inside a
function (lazy imports count: they are dependencies all the same). The graph should be a DAG
whose edges all point down `LAYERS` (DESIGN.md's layout).

    python tools/import_graph.py            # units, edges, cycles, layer violations
    python tools/import_graph.py --json     # the same as JSON
    python tools/import_graph.py --files    # every file-level import behind each edge

Exit status 1 when there is a cycle or an edge that points up the layer list.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "moe"

# DESIGN.md's layout, bottom to top: a unit may import only units before it in this list.
LAYERS = (
    "config",
    "model",
    "data",
    "io",
    "train",
    "eval",
    "generate",
    "delta",
    "merge",
    "surgery",
    "experiments",
    "cli",
)


def unit_of(module: str) -> str | None:
    """'moe.eval.stats' -> 'eval'; 'moe' itself and non-moe modules -> None."""
    parts = module.split(".")
    if parts[0] != "moe" or len(parts) < 2:
        return None
    return parts[1]


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[str, int]]:
    """Every module this file imports (absolute name, line), wherever the import statement is."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            # `from moe import eval` names a unit by its attribute
            if target == "moe":
                found += [(f"moe.{alias.name}", node.lineno) for alias in node.names]
    return found


def graph(package: Path = PACKAGE):
    """(units, edges {(a, b): [(file, line, module), ...]})."""
    units = sorted(
        p.stem if p.suffix == ".py" else p.name
        for p in package.iterdir()
        if (p.suffix == ".py" and p.name != "__init__.py")
        or (p.is_dir() and (p / "__init__.py").exists())
    )
    edges: dict[tuple[str, str], list[tuple[str, int, str]]] = defaultdict(list)
    root = package.parent
    for path in sorted(package.rglob("*.py")):
        src = unit_of(module_name(path, root))
        if src is None:
            continue
        for target, line in imports_of(path, root):
            dst = unit_of(target)
            if dst is not None and dst != src and dst in units:
                edges[(src, dst)].append((str(path.relative_to(root)), line, target))
    return units, dict(edges)


def cycles(units, edges) -> list[list[str]]:
    """Strongly connected components with more than one unit (Tarjan)."""
    succ = defaultdict(list)
    for a, b in edges:
        succ[a].append(b)
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in units:
        if v not in index:
            visit(v)
    return out


def upward(edges, layers=LAYERS) -> list[tuple[str, str]]:
    """Edges from a unit to one at or above it in `layers` (or to/from a unit not listed)."""
    rank = {u: i for i, u in enumerate(layers)}
    return sorted(
        (a, b) for a, b in edges if a not in rank or b not in rank or rank[b] >= rank[a]
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the graph as JSON")
    parser.add_argument("--files", action="store_true", help="list the imports behind each edge")
    args = parser.parse_args(argv)
    units, edges = graph()
    found = cycles(units, edges)
    bad = upward(edges)
    if args.json:
        print(json.dumps({
            "units": units,
            "edges": sorted([a, b] for a, b in edges),
            "cycles": found,
            "upward": [list(e) for e in bad],
        }, indent=1))
    else:
        print(f"{len(units)} units, {len(edges)} edges, {len(found)} cycle(s)")
        for a, b in sorted(edges):
            mark = "  UP" if (a, b) in bad else ""
            print(f"  {a} -> {b} ({len(edges[(a, b)])}){mark}")
            if args.files:
                for f, line, target in edges[(a, b)]:
                    print(f"      {f}:{line} {target}")
        for c in found:
            print(f"cycle: {' '.join(c)}")
    return 1 if found or bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `... | head`: the reader went away
        sys.exit(0)
