"""Built-in `code` corpus: the `.py` files of this machine's Python standard library.

Every Python installation has them, so the corpus needs no network. One file is one document,
read as raw bytes (a file in another encoding is still valid input to the byte tokenizer). The
walk skips installed third-party packages (site-packages, dist-packages, which differ between
machines) and test suites (`test`, `tests`, `idle_test`: they hold deliberately malformed files
and would dominate the corpus).
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

from moe.data.documents import Document

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative posix paths of the standard library's .py files, sorted (deterministic order)."""
    root = root or stdlib_root()
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in SKIP_DIRS]
        for f in files:
            if f.endswith(".py"):
                out.append(Path(d, f).relative_to(root).as_posix())
    return sorted(out)


def code_documents(domain: str = "code") -> list[Document]:
    root = stdlib_root()
    v = sys.version_info
    origin = f"Python {v.major}.{v.minor} standard library ({root})"
    return [Document(rel, (root / rel).read_bytes(), domain, origin) for rel in stdlib_files(root)]
