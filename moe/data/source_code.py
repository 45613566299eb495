"""Built-in `code` corpus: pinned samples of two standard libraries, shipped as package data.

- CPython 3.11.7: 322 `.py` files of the standard library (no test suite);
- Go 1.19: the `.go` files of whole standard-library packages (strings, fmt, encoding/json,
  regexp, math/big, ...), their tests included.

Pinned, not read from the running interpreter: the standard library differs between Python
versions, and results would with it. Two languages make the domain closer to real repositories
than one. The archives also hold test data (compressed files, assembly, C); only `.py` and `.go`
files are code here. Each file is cut into documents of a few hundred bytes at blank lines,
preferring the start of a top-level definition (moe.data.documents.split_blocks). With
`strip_headers` (`data.dedup`), each file's licence header comment is removed first
(moe.data.dedup.strip_license_header): the same three Go lines head 273 files.
"""

from __future__ import annotations

from functools import lru_cache

from moe.data.dedup import strip_license_header
from moe.data.documents import Document, piece_documents
from moe.data.shipped import tar_sample

# (archive under samples/, document id prefix, suffixes kept, description)
ARCHIVES = (
    ("code/cpython3.11_stdlib_sample.tar.gz", "cpython3.11", (".py",),
     "CPython 3.11.7 standard library sample"),
    ("code/go1.19_stdlib_sample.tar.gz", "go1.19", (".go",), "Go 1.19 standard library sample"),
)


def code_files() -> list[tuple[str, str, bytes]]:
    """(document id prefix, member path, bytes) of every source file, in a fixed order."""
    return [(prefix, name, data) for rel, prefix, suffixes, _ in ARCHIVES
            for name, data in tar_sample(rel, suffixes)]


@lru_cache(maxsize=4)
def _code_documents(domain: str, strip_headers: bool = False) -> tuple[Document, ...]:
    docs: list[Document] = []
    for rel, prefix, suffixes, what in ARCHIVES:
        files = tar_sample(rel, suffixes)
        origin = f"{what}, {len(files)} files (moe/data/samples/{rel})"
        for name, data in files:
            if strip_headers:
                data = strip_license_header(data, name)
            docs += piece_documents(data, f"{prefix}/{name}", domain, origin, prose=False)
    return tuple(docs)


def code_documents(domain: str = "code", strip_headers: bool = False) -> list[Document]:
    return list(_code_documents(domain, strip_headers))
