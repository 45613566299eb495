"""`files` sources: the user's own local files.

- FASTA (.fa .fasta .fna, optionally .gz): our reader (moe.data.documents.parse_fasta), cut into
  1,024-base windows.
- Plain text (.txt .text .md): read as raw bytes and cut into ~2 KB blocks at blank lines. We
  read these ourselves rather than through `datasets`: its text builder must decode the file, and
  then either fails on bytes that are not UTF-8 or replaces them; the byte tokenizer takes any
  bytes, so nothing is lost or refused.
- Tables (.json .jsonl .csv .parquet .arrow): `datasets.load_dataset` with the file's builder,
  one row's `text_field` per document.
Paths may be globs; relative paths are relative to the working directory.
"""

from __future__ import annotations

import glob
import gzip
from pathlib import Path

from moe.config import ConfigError, SourceConfig
from moe.data.documents import Document, fasta_documents, split_blocks

FASTA_EXT = (".fa", ".fasta", ".fna")
TEXT_EXT = (".txt", ".text", ".md")
TABLE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
                  ".arrow": "arrow"}


def expand_paths(patterns: list[str], domain: str) -> list[Path]:
    out: list[Path] = []
    for pat in patterns:
        hits = sorted(glob.glob(pat, recursive=True)) if glob.has_magic(pat) else [pat]
        hits = [h for h in hits if Path(h).is_file()]
        if not hits:
            raise ConfigError(f"data.sources.{domain}.paths: no file matches {pat!r}")
        out.extend(Path(h) for h in hits)
    return out


def _suffix(path: Path) -> str:
    name = path.name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    return Path(name).suffix


def _table_documents(path: Path, src: SourceConfig, domain: str) -> list[Document]:
    import datasets

    builder = TABLE_BUILDERS[_suffix(path)]
    try:
        ds = datasets.load_dataset(builder, data_files=[str(path)], split="train")
    except Exception as e:  # datasets wraps parser errors in several exception types
        cause = e.__cause__ or e
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ConfigError(f"data.sources.{domain}: cannot read {path}: {first}") from None
    if src.text_field not in ds.column_names:
        raise ConfigError(
            f"data.sources.{domain}.text_field: column {src.text_field!r} not in {path} "
            f"(columns: {', '.join(ds.column_names)})"
        )
    origin = f"{path} ({builder})"
    docs = []
    for i, value in enumerate(ds[src.text_field]):
        if value is None:
            continue
        data = value if isinstance(value, bytes) else str(value).encode("utf-8")
        docs.append(Document(f"{path.name}/{i}", data, domain, origin))
    return docs


def file_documents(path: Path, src: SourceConfig, domain: str) -> list[Document]:
    ext = _suffix(path)
    if ext in FASTA_EXT:
        raw = path.read_bytes()
        raw = gzip.decompress(raw) if path.name.lower().endswith(".gz") else raw
        return fasta_documents(raw, path.name, domain, f"{path} (FASTA)")
    if ext in TEXT_EXT:
        blocks = split_blocks(path.read_bytes())
        return [Document(f"{path.name}/{i}", b, domain, f"{path} (text)")
                for i, b in enumerate(blocks)]
    if ext in TABLE_BUILDERS:
        return _table_documents(path, src, domain)
    known = ", ".join(FASTA_EXT + TEXT_EXT + tuple(TABLE_BUILDERS))
    raise ConfigError(f"data.sources.{domain}.paths: {path}: unsupported file type (use {known})")


def files_documents(src: SourceConfig, domain: str) -> list[Document]:
    docs: list[Document] = []
    for path in expand_paths(src.paths, domain):
        docs.extend(file_documents(path, src, domain))
    seen: set[str] = set()
    for d in docs:
        # two files of the same name in different folders would collide on doc_id
        if d.doc_id in seen:
            raise ConfigError(
                f"data.sources.{domain}.paths: two files give document {d.doc_id!r}; "
                "give files distinct names"
            )
        seen.add(d.doc_id)
    return docs
