"""Built-in `dna` corpus: four real genomes shipped as FASTA (see samples/README.md).

Each genome is cut into 1,024-base windows so the held-out split by document works.
"""

from __future__ import annotations

from pathlib import Path

from moe.data.documents import Document, fasta_documents

DNA_DIR = Path(__file__).parent / "samples" / "dna"


def dna_documents(domain: str = "dna") -> list[Document]:
    paths = sorted(DNA_DIR.glob("*.fa"))
    origin = f"genomes {', '.join(p.stem for p in paths)} (FASTA in moe/data/samples/dna)"
    docs = []
    for path in paths:
        docs.extend(fasta_documents(path.read_bytes(), path.stem, domain, origin))
    return docs
