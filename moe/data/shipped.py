"""The corpus samples shipped as package data (moe/data/samples/, provenance in its README).

Large samples stay compressed in the package (.gz, .tar.gz) and are decompressed in memory when
a corpus is built; nothing is extracted to disk. `samples_digest` fingerprints every shipped file,
so a tokenized corpus cached on disk is rebuilt when a sample changes.
"""

from __future__ import annotations

import gzip
import hashlib
import tarfile
from functools import lru_cache
from pathlib import Path

SAMPLES = Path(__file__).parent / "samples"

# Every shipped sample and its SHA256 (the table of samples/README.md; tests/data checks both).
SHA256 = {
    "text/tinyshakespeare.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    "text/austen_novels.txt.gz": "289a01dd471ae81438500896aa95f691203a306861a2aceca7e8e937039773c1",
    "code/cpython3.11_stdlib_sample.tar.gz":
        "f31dcce57ca7d38544bdebef5820327dfb9c5328e741e85275b7e6002573035f",
    "code/go1.19_stdlib_sample.tar.gz":
        "7d25d11c78ce3f624be00fab3db40592f6fbdae2212ca18287713d1e0ca11882",
    "code/CPYTHON_LICENSE.txt": "3b2f81fe21d181c499c59a256c8e1968455d6689d269aa85373bfb6af41da3bf",
    "code/GO_COPYRIGHT.txt": "3438b01d606caa8a2240889fc80c9cd51b44ea87ac97bcedf670713027fd7df1",
    "dna/arabidopsis_chloroplast.fa":
        "2bcb6eec38c296e92ab396b9cfc58db4f09860348bd9287f92149d714cce2683",
    "dna/human_mito.fa": "61d555747e94900b594911f556356f5a2b719fe193d44ea13138f7fe017bc63b",
    "dna/lambda_phage.fa": "0a04f81952deb68c204e8ae67e0573cb97d348f18ab1b527630d57c294028cf5",
    "dna/orangutan_mito.fa": "a3c28ab80821b706873f9a0b6983f9c949dd6bf56dd61a9b3e0347aa2a58fe57",
    "dna/staphylococcus_aureus_N315.fa.gz":
        "f00af0fea6d59d4aef1cac64be57a5215739b7c23fae7f6bc0d44e1f9805a0e9",
    "dna/helicobacter_pylori_G27.fa.gz":
        "80dd2ad4125b47fa644350cec0bee7bf3956e379bf3e3e97a25e9c17ba297658",
}


def sample_path(rel: str) -> Path:
    return SAMPLES / rel


def read_sample(rel: str) -> bytes:
    """A shipped file's bytes, gunzipped when it ends in .gz."""
    raw = sample_path(rel).read_bytes()
    return gzip.decompress(raw) if rel.endswith(".gz") else raw


def tar_sample(rel: str, suffixes: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """(member path, bytes) of a shipped .tar.gz's regular files ending in `suffixes`, sorted by
    path. Members are only read, never extracted, so their paths cannot write anywhere."""
    out = []
    with tarfile.open(sample_path(rel), "r:gz") as tf:
        for m in tf.getmembers():
            if m.isfile() and m.name.endswith(suffixes):
                f = tf.extractfile(m)
                if f is not None:
                    out.append((m.name, f.read()))
    return sorted(out)


@lru_cache(maxsize=1)
def samples_digest() -> str:
    """SHA256 over every file under samples/ (path and content): changes when any sample does."""
    h = hashlib.sha256()
    for p in sorted(SAMPLES.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(SAMPLES).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()
