"""Built-in `dna` corpus: six real genomes shipped as FASTA (see samples/README.md): two
bacterial chromosomes (4.5 Mb, gzipped), a chloroplast, phage lambda and two mitochondria.

Each genome is cut into 256-base windows (the documents) grouped into 4,096-base regions; whole
regions go to held-out (moe.data.documents.fasta_documents), so a held-out window never sits
beside a training window of the same genome except at a region's two ends.
"""

from __future__ import annotations

from functools import lru_cache

from moe.data.documents import Document, fasta_documents
from moe.data.shipped import SAMPLES, read_sample

GENOMES = {  # file name without .fa/.fa.gz -> what it is (origin of its documents)
    "staphylococcus_aureus_N315": "Staphylococcus aureus N315 chromosome, NC_002745.2",
    "helicobacter_pylori_G27": "Helicobacter pylori G27 chromosome, NC_011333.1",
    "arabidopsis_chloroplast": "Arabidopsis thaliana chloroplast, NC_000932.1",
    "lambda_phage": "Enterobacteria phage lambda, NC_001416.1",
    "human_mito": "human mitochondrion",
    "orangutan_mito": "orangutan mitochondrion",
}
DNA_DIR = SAMPLES / "dna"


def genome_files() -> list[tuple[str, str]]:
    """(genome name, path under samples/) of every shipped genome, sorted by name."""
    out = []
    for p in DNA_DIR.iterdir():
        for ext in (".fa", ".fa.gz"):
            if p.name.endswith(ext):
                out.append((p.name[: -len(ext)], f"dna/{p.name}"))
    return sorted(out)


@lru_cache(maxsize=4)
def _dna_documents(domain: str) -> tuple[Document, ...]:
    docs: list[Document] = []
    for name, rel in genome_files():
        origin = f"{GENOMES.get(name, name)} (moe/data/samples/{rel})"
        docs += fasta_documents(read_sample(rel), name, domain, origin)
    return tuple(docs)


def dna_documents(domain: str = "dna") -> list[Document]:
    return list(_dna_documents(domain))
