"""`files` sources: the user's own local files. Every format may be gzipped (`name.ext.gz`).

- FASTA (.fa .fasta .fna): our reader (moe.data.documents.parse_fasta), cut into 256-base
  windows grouped into 4,096-base regions (the held-out unit), as the built-in genomes are.
- Plain text (.txt .text .md): read as raw bytes and cut into pieces of 128-512 bytes at blank
  lines and sentence ends. We read these ourselves rather than through `datasets`: its text
  builder must decode the file, and then either fails on bytes that are not UTF-8 or replaces
  them; the byte tokenizer takes any bytes, so text in Latin-1 or another encoding is kept as is.
- Tables (.json .jsonl .csv .parquet .arrow): `datasets.load_dataset` with the file's builder
  (it reads gzipped json and csv itself); a gzipped parquet or arrow file is read from memory
  with pyarrow. One row's `text_field` per document.

An evaluation set (`moe eval --data DOMAIN=FILE`, `natural=True`) keeps each document at its
natural length: the pieces of a text file share one group (the whole file), the windows of a
FASTA record one group (the whole record), and a table row is one document already. The group is
the document `moe eval` scores whole (moe.eval.rolling); training corpora are cut as above.

Refused with one line naming the file: an extension we cannot read (other compressions
included), a `.gz` that is not gzip data or is cut short, and binary content in a text or FASTA
file (a file of another format renamed, a compressed file without its suffix other than gzip).
Gzip data is recognised by its first bytes, so a gzipped file missing its `.gz` is read too.
Paths may be globs; relative paths are relative to the working directory.
"""

from __future__ import annotations

import glob
import gzip
import zlib
from pathlib import Path

from moe.config import ConfigError, SourceConfig
from moe.data.documents import DNA_REGION, Document, fasta_documents, piece_documents

FASTA_EXT = (".fa", ".fasta", ".fna")
TEXT_EXT = (".txt", ".text", ".md")
TABLE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
                  ".arrow": "arrow"}
GZIP_MAGIC = b"\x1f\x8b"
# Formats recognised only to name them in the refusal (their data is binary to our readers).
OTHER_MAGIC = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd",
               b"PK\x03\x04": "zip", b"7z\xbc\xaf\x27\x1c": "7z", b"%PDF": "PDF"}
OTHER_EXT = {".bz2": "bzip2 files", ".xz": "xz files", ".zst": "zstd files", ".lz4": "lz4 files",
             ".lzma": "lzma files", ".zip": "zip archives", ".7z": "7z archives",
             ".tar": "tar archives", ".tgz": "tar archives"}
# Bytes that text does not contain: C0 controls other than tab, line feed, vertical tab, form
# feed (Python and C sources use it), carriage return and escape (colour codes in logs); and
# DEL. Random or compressed bytes hold about 11% of them. Invalid UTF-8 alone is no sign of
# binary data: Latin-1 or Windows-1251 text is full of it, and the byte tokenizer reads it.
CONTROL_BYTES = bytes([*range(0, 9), *range(14, 27), *range(28, 32), 127])
BINARY_SHARE = 0.01  # more than this share of control bytes: not text


def expand_paths(patterns: list[str], domain: str) -> list[Path]:
    out: list[Path] = []
    for pat in patterns:
        found = sorted(glob.glob(pat, recursive=True)) if glob.has_magic(pat) else [pat]
        hits = [h for h in found if Path(h).is_file()]
        if not hits:
            raise ConfigError(f"data.sources.{domain}.paths: {no_files(pat, found)}")
        out.extend(Path(h) for h in hits)
    return out


def no_files(pattern: str, found: list[str]) -> str:
    """Why a path or glob names no file to read (`found`: what the glob matched). A directory
    is not read whole (it may hold notes, other formats, hidden files): the message gives the
    glob of its readable files."""
    p = Path(pattern)
    if not glob.has_magic(pattern) and p.is_dir():
        return f"{pattern} is a directory; give its files as a path or glob{_dir_hint(p)}"
    dirs = [d for d in found if Path(d).is_dir()]
    if dirs:
        return f"{pattern!r} matches only directories ({dirs[0]}, ...); give a glob of files"
    return f"no file matches {pattern!r}"


def _dir_hint(d: Path, limit: int = 10_000) -> str:
    """`, e.g. 'D/**/*.txt'` for the commonest readable type among (up to `limit` of) its files."""
    readable = (*FASTA_EXT, *TEXT_EXT, *TABLE_BUILDERS)
    counts: dict[tuple[str, bool], int] = {}
    seen = 0
    for f in d.rglob("*"):
        seen += 1
        if seen > limit:
            break
        if f.is_file() and not f.name.startswith(".") and _suffix(f) in readable:
            key = (_suffix(f) + (".gz" if _gzipped(f) else ""), f.parent != d)
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return f" (it holds no file of a type read here: {', '.join(readable)}, optionally .gz)"
    (ext, deep), _ = max(counts.items(), key=lambda kv: kv[1])
    return f", e.g. '{d / ('**/*' if deep else '*')}{ext}'"


def _gzipped(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    return Path(name).suffix


def _where(path: Path, domain: str) -> str:
    return f"data.sources.{domain}.paths: {path}"


def read_bytes(path: Path, domain: str) -> bytes:
    """The file's bytes, gunzipped when it is gzip data (by its first bytes) or named `.gz`."""
    raw = path.read_bytes()
    if not raw.startswith(GZIP_MAGIC):
        if _gzipped(path):
            raise ConfigError(f"{_where(path, domain)}: named .gz but not gzip data")
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:  # cut short, or a corrupt stream
        why = "cut short" if isinstance(e, EOFError) else str(e).strip() or type(e).__name__
        raise ConfigError(f"{_where(path, domain)}: unreadable gzip data ({why})") from None


def check_text(data: bytes, path: Path, domain: str) -> None:
    """Refuse binary content in a text or FASTA file (see CONTROL_BYTES)."""
    if not data:
        return
    n = len(data) - len(data.translate(None, CONTROL_BYTES))
    if n <= BINARY_SHARE * len(data):
        return
    kind = next((f"{v} data" for k, v in OTHER_MAGIC.items() if data.startswith(k)),
                "binary data")
    raise ConfigError(
        f"{_where(path, domain)}: {kind}, not text ({n / len(data):.0%} of its bytes are NUL "
        "or control bytes; give text, FASTA or table files, gzipped or not)"
    )


def _read_table_gz(raw: bytes, builder: str):
    """A gzipped parquet or arrow file (which `datasets` cannot read) as a pyarrow table."""
    import pyarrow as pa

    data = gzip.decompress(raw)
    if builder == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(pa.BufferReader(data))
    try:  # `datasets` writes the Arrow stream format; pyarrow can also write the file format
        return pa.ipc.open_stream(data).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.BufferReader(data)).read_all()


def _first_line(e: BaseException) -> str:
    cause = e.__cause__ or e
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


def _table_documents(path: Path, src: SourceConfig, domain: str) -> list[Document]:
    builder = TABLE_BUILDERS[_suffix(path)]
    try:
        if _gzipped(path):
            with path.open("rb") as f:  # a .gz that is no gzip gets our message, not a parser's
                if f.read(2) != GZIP_MAGIC:
                    raise ConfigError(f"{_where(path, domain)}: named .gz but not gzip data")
        if _gzipped(path) and builder in ("parquet", "arrow"):
            table = _read_table_gz(path.read_bytes(), builder)
            columns = table.column_names
            values = table.column(src.text_field).to_pylist() if src.text_field in columns else []
        else:
            import datasets

            ds = datasets.load_dataset(builder, data_files=[str(path)], split="train")
            columns = ds.column_names
            values = ds[src.text_field] if src.text_field in columns else []
    except ConfigError:
        raise
    except Exception as e:  # datasets and pyarrow wrap parser errors in several exception types
        raise ConfigError(f"data.sources.{domain}: cannot read {path}: {_first_line(e)}") from None
    if src.text_field not in columns:
        raise ConfigError(
            f"data.sources.{domain}.text_field: column {src.text_field!r} not in {path} "
            f"(columns: {', '.join(columns)})"
        )
    origin = f"{path} ({builder}{', gzip' if _gzipped(path) else ''})"
    docs = []
    for i, value in enumerate(values):
        if value is None:
            continue
        data = value if isinstance(value, bytes) else str(value).encode("utf-8")
        docs.append(Document(f"{path.name}/{i}", data, domain, origin))
    return docs


def file_documents(path: Path, src: SourceConfig, domain: str,
                   natural: bool = False) -> list[Document]:  # fmt: skip
    """The file's documents; `natural`: grouped into whole files and FASTA records (an
    evaluation set, see the module docstring)."""
    ext = _suffix(path)
    if ext in FASTA_EXT or ext in TEXT_EXT:
        data = read_bytes(path, domain)
        check_text(data, path, domain)
        if ext in FASTA_EXT:
            return fasta_documents(data, path.name, domain, f"{path} (FASTA)",
                                   region=0 if natural else DNA_REGION)  # fmt: skip
        return piece_documents(data, path.name, domain, f"{path} (text)",
                               group=path.name if natural else "")  # fmt: skip
    if ext in TABLE_BUILDERS:
        return _table_documents(path, src, domain)
    known = ", ".join(FASTA_EXT + TEXT_EXT + tuple(TABLE_BUILDERS))
    other = OTHER_EXT.get(ext) or OTHER_EXT.get(Path(path.name.lower()).suffix)
    what = f"{other} are not read" if other else "unsupported file type"
    raise ConfigError(f"{_where(path, domain)}: {what} (use {known}, each optionally gzipped "
                      "as .gz)")


def files_documents(src: SourceConfig, domain: str, natural: bool = False) -> list[Document]:
    docs: list[Document] = []
    for path in expand_paths(src.paths, domain):
        docs.extend(file_documents(path, src, domain, natural))
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
