"""Built-in `text` corpus: Jane Austen's six novels and Shakespeare's plays (tinyshakespeare),
both shipped as package data, so the corpus is the same on every machine and Python version.

The novels are cut into paragraph-sized documents (a long paragraph at sentence ends), the
plays into documents of whole speeches (moe.data.documents.split_blocks).
"""

from __future__ import annotations

import re
from functools import lru_cache

from moe.data.documents import Document, piece_documents
from moe.data.shipped import read_sample

AUSTEN = "text/austen_novels.txt.gz"
SHAKESPEARE = "text/tinyshakespeare.txt"
# the file's own separator line before each novel (added when the novels were packed together)
_NOVEL = re.compile(rb"^=== (\w+) ===\n", re.MULTILINE)


def austen_novels() -> list[tuple[str, bytes]]:
    """(name, text) of each novel, in the file's order; the separator lines are dropped."""
    raw = read_sample(AUSTEN)
    heads = list(_NOVEL.finditer(raw))
    return [(m.group(1).decode(), raw[m.end() : nxt.start() if nxt else len(raw)].strip() + b"\n")
            for m, nxt in zip(heads, heads[1:] + [None])]


def austen_documents(domain: str = "text") -> list[Document]:
    origin = f"Jane Austen's novels (moe/data/samples/{AUSTEN})"
    docs = []
    for name, body in austen_novels():
        docs += piece_documents(body, f"austen/{name}", domain, origin)
    return docs


def shakespeare_documents(domain: str = "text") -> list[Document]:
    origin = f"tinyshakespeare, Shakespeare's plays (moe/data/samples/{SHAKESPEARE})"
    return piece_documents(read_sample(SHAKESPEARE), "tinyshakespeare", domain, origin)


@lru_cache(maxsize=4)
def _text_documents(domain: str) -> tuple[Document, ...]:
    return tuple(austen_documents(domain) + shakespeare_documents(domain))


def text_documents(domain: str = "text") -> list[Document]:
    return list(_text_documents(domain))
