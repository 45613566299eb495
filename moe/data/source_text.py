"""Built-in `text` corpus: Shakespeare's plays (shipped sample) and CPython's own English prose.

tinyshakespeare is split into ~2 KB documents of whole speeches. `pydoc_data.topics` (the text
behind `help("if")`, shipped with every CPython) adds technical English prose, one topic cut into
blocks the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

from moe.data.documents import Document, split_blocks

SAMPLES = Path(__file__).parent / "samples"
SHAKESPEARE = SAMPLES / "text" / "tinyshakespeare.txt"


def shakespeare_documents(domain: str = "text") -> list[Document]:
    origin = "tinyshakespeare (public domain plays, moe/data/samples/text)"
    blocks = split_blocks(SHAKESPEARE.read_bytes())
    return [Document(f"tinyshakespeare/{i:05d}", b, domain, origin) for i, b in enumerate(blocks)]


def pydoc_topic_documents(domain: str = "text") -> list[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package it separately; Shakespeare still works
        return []
    v = sys.version_info
    origin = f"Python {v.major}.{v.minor} pydoc_data.topics (reference manual prose)"
    docs = []
    for key in sorted(topics):
        for j, b in enumerate(split_blocks(topics[key].encode("utf-8"))):
            docs.append(Document(f"pydoc_topics/{key}/{j}", b, domain, origin))
    return docs


def text_documents(domain: str = "text") -> list[Document]:
    return shakespeare_documents(domain) + pydoc_topic_documents(domain)
