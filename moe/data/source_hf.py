"""`hf` sources: a Hugging Face hub dataset (needs network, or a warm `datasets` cache).

Rows are streamed in the dataset's order until the domain's byte budget is met, so a large hub
dataset is never downloaded whole; the balance step then orders them by hash like any corpus.
"""

from __future__ import annotations

from moe.config import ConfigError, SourceConfig
from moe.data.documents import Document


def hf_documents(src: SourceConfig, domain: str, budget: int) -> list[Document]:
    try:
        import datasets

        ds = datasets.load_dataset(src.name, src.subset, split=src.split, streaming=True)
        origin = f"hub dataset {src.name}" + (f"/{src.subset}" if src.subset else "")
        docs: list[Document] = []
        total = 0
        for i, row in enumerate(ds):
            if src.text_field not in row:
                raise ConfigError(
                    f"data.sources.{domain}.text_field: column {src.text_field!r} not in "
                    f"{src.name} (columns: {', '.join(row)})"
                )
            value = row[src.text_field]
            if value is None:
                continue
            data = value if isinstance(value, bytes) else str(value).encode("utf-8")
            docs.append(Document(f"{src.split}/{i}", data, domain, origin))
            total += len(data)
            if total >= budget:
                break
        return docs
    except ConfigError:
        raise
    except Exception as e:  # network, auth, unknown name: all one line for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"data.sources.{domain}: cannot load hub dataset {src.name!r}: {first}"
        ) from None
