"""Rolling log-likelihood of whole documents: lm-evaluation-harness's `loglikelihood_rolling`.

Each document is tokenized alone, with no special token (moe.data.streams.tokenize_units). Its
first token is predicted after one prefix token: the tokenizer's BOS, or its EOS when it has no
BOS of its own (lm-eval's `prefix_token_id`). Write seq = [prefix] + document (n + 1 tokens);
target j (1..n) is seq[j], predicted from what comes before it. A window feeds `seq[lo:hi]` to
the model and scores the last k of its targets `seq[lo + 1 : hi + 1]`.

- Disjoint windows (`stride=None`, the default), as lm-eval builds them with
  `get_rolling_token_windows(tokens, prefix, max_seq_len=context, context_len=1)` and
  `make_disjoint_window`: the first window feeds the prefix and the first context - 1 tokens and
  scores the first min(context, n) tokens; every later window scores the next `context` tokens
  (fewer at the end) after the tokens just before them, `context` inputs in all: the last window
  reaches back to fill its context, so it re-reads tokens an earlier window scored, and scores
  only its new ones.
- Sliding windows (`stride=S`, 0 < S < context): the Hugging Face perplexity guide's loop run over
  seq with windows of `context` inputs starting at 0, S, 2S, ...; each scores only the targets no
  earlier window scored, and the last one ends at the document's last token. Every token but the
  first few then sees at least context - S tokens before it.

Every token of a document is scored exactly once, so a document's NLL is the sum over its windows.
Windows of all documents are batched together (sorted by length, right-padded; a causal model
never reads the padding), the losses summed in float64 per document. Bits per byte = total NLL /
ln 2 / total UTF-8 bytes of the documents (moe.model.loss.bits_per_byte).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from moe.config import ConfigError
from moe.model.loss import IGNORE_INDEX, linear_cross_entropy
from moe.model.transformer import Transformer


@dataclass(frozen=True)
class Window:
    doc: int  # which document
    lo: int  # feeds seq[lo:hi] (seq = [prefix] + document)
    hi: int
    scored: int  # scores the last `scored` targets of seq[lo + 1 : hi + 1]


def check_protocol(context: int | None, stride: int | None, max_docs: int | None,
                   max_seq_len: int, cli: bool = True) -> int:  # fmt: skip
    """The context to score at (default: the model's `max_seq_len`); one line for a context
    beyond the model's, a stride outside 0 < stride < context, or max_docs < 1. `cli`: name the
    options as the command line does (--max-docs), else as keywords (max_docs)."""
    name = {k: (f"--{k.replace('_', '-')}" if cli else k)
            for k in ("context", "stride", "max_docs")}  # fmt: skip
    ctx = max_seq_len if context is None else int(context)
    if not 1 <= ctx <= max_seq_len:
        raise ConfigError(f"{name['context']} {ctx}: must be between 1 and the model's context "
                          f"({max_seq_len} tokens)")
    if stride is not None and not 0 < int(stride) < ctx:
        raise ConfigError(f"{name['stride']} {stride}: must be between 1 and the context minus "
                          f"one ({ctx - 1}); leave it unset for disjoint windows")
    if max_docs is not None and int(max_docs) < 1:
        raise ConfigError(f"{name['max_docs']} {max_docs}: must be at least 1 (unset: every "
                          "document)")
    return ctx


def prefix_token(tokenizer) -> tuple[int, str]:
    """(id, "bos" | "eos"): what the first token of a document is predicted after."""
    if getattr(tokenizer, "has_bos", True):
        return int(tokenizer.bos_id), "bos"
    return int(tokenizer.eos_id), "eos"


def windows(n: int, context: int, stride: int | None = None, doc: int = 0) -> list[Window]:
    """The windows of a document of n tokens (see the module docstring); none when n = 0."""
    if n <= 0:
        return []
    out: list[Window] = []
    if stride is None:  # lm-eval's disjoint windows
        done = min(context, n)
        out.append(Window(doc, 0, done, done))
        while done < n:
            k = min(n - done, context)
            end = done + k  # the last target scored: seq[end]
            out.append(Window(doc, end - context, end, k))
            done = end
        return out
    begin, prev = 0, 0
    while True:  # the Hugging Face guide's sliding windows
        end = min(begin + context, n)
        out.append(Window(doc, begin, end, end - prev))
        if end == n:
            return out
        prev, begin = end, begin + stride


def window_tokens(tokens, prefix: int, w: Window) -> tuple[list[int], list[int]]:
    """(the window's inputs, the tokens it scores), as plain lists: what tests compare with
    lm-eval's windows."""
    seq = [prefix, *(int(t) for t in tokens)]
    return seq[w.lo : w.hi], seq[w.hi + 1 - w.scored : w.hi + 1]


def _seq(tokens: np.ndarray, prefix: int, lo: int, hi: int) -> np.ndarray:
    """seq[lo:hi] of seq = [prefix] + tokens, as int64."""
    body = tokens[max(lo - 1, 0) : hi - 1].astype(np.int64)
    return np.concatenate([[prefix], body]) if lo == 0 else body


def _batches(wins: list[Window], budget: int) -> list[list[Window]]:
    """Windows sorted longest first, grouped so that each batch holds at most `budget` padded
    positions (always at least one window)."""
    order = sorted(wins, key=lambda w: -(w.hi - w.lo))
    out: list[list[Window]] = []
    for w in order:
        if out and (len(out[-1]) + 1) * (out[-1][0].hi - out[-1][0].lo) <= budget:
            out[-1].append(w)
        else:
            out.append([w])
    return out


@dataclass
class Scores:
    """Per document: NLL (nats, float64), tokens scored, bytes; routing counts (layers, E) of the
    scored positions for an MoE, else None."""

    nats: np.ndarray
    tokens: np.ndarray
    bytes: np.ndarray
    routing: torch.Tensor | None = None
    token_nats: list[np.ndarray] | None = None  # with per_token=True: each token's NLL, (n,)


@torch.no_grad()
def score_documents(
    model: Transformer,
    docs: list[tuple[np.ndarray, int]],
    prefix: int,
    context: int,
    stride: int | None = None,
    batch_size: int = 8,
    pad_id: int = 0,
    domain: int | None = None,
    progress: bool = False,
    desc: str = "eval",
    per_token: bool = False,
) -> Scores:
    """NLL of each document ((tokens, bytes) pairs) under the rolling protocol.

    `batch_size`: windows of `context` tokens per forward pass (shorter windows are packed more
    per pass, up to batch_size * context positions); `domain`: the expert index a domain-routed
    MoE gives every token (the `domain` router's hint); `per_token`: keep each token's NLL too
    (`token_nats`, what an ensemble mixes)."""
    if context > model.config.max_seq_len:
        raise ConfigError(f"context {context} exceeds the model's {model.config.max_seq_len}")
    device = next(model.parameters()).device
    nats = np.zeros(len(docs), dtype=np.float64)
    ntok = np.zeros(len(docs), dtype=np.int64)
    wins = [w for i, (t, _) in enumerate(docs) for w in windows(len(t), context, stride, i)]
    each = [np.zeros(len(t), dtype=np.float64) for t, _ in docs] if per_token else None
    counts = None
    for batch in tqdm(_batches(wins, batch_size * context), desc=desc, leave=False,
                      disable=not progress):  # fmt: skip
        L = batch[0].hi - batch[0].lo
        x = torch.full((len(batch), L), pad_id, dtype=torch.long)
        y = torch.full((len(batch), L), IGNORE_INDEX, dtype=torch.long)
        for r, w in enumerate(batch):
            seq = torch.from_numpy(_seq(docs[w.doc][0], prefix, w.lo, w.hi + 1))
            m = w.hi - w.lo
            x[r, :m] = seq[:-1]
            y[r, m - w.scored : m] = seq[m - w.scored + 1 :]
        x, y = x.to(device), y.to(device)
        hint = None if domain is None else torch.full((len(batch),), domain, device=device)
        out = model(x, domain=hint, return_hidden=True)
        _, losses = linear_cross_entropy(out.hidden, model.head_weight, y)  # (B, L)
        per_row = losses.double().sum(-1).cpu().numpy()
        rows = losses.double().cpu().numpy() if per_token else None
        for r, w in enumerate(batch):
            nats[w.doc] += per_row[r]
            ntok[w.doc] += w.scored
            if rows is not None:  # targets hi - scored .. hi - 1 of the document
                m = w.hi - w.lo
                each[w.doc][w.hi - w.scored : w.hi] = rows[r, m - w.scored : m]
        if out.router_stats:
            keep = (y != IGNORE_INDEX).reshape(-1)
            c = torch.stack([
                torch.bincount(s["expert_ids"][keep].reshape(-1), minlength=s["num_experts"]).cpu()
                for s in out.router_stats
            ])  # (layers, E)  # fmt: skip
            counts = c if counts is None else counts + c
    nbytes = np.array([b for _, b in docs], dtype=np.int64)
    return Scores(nats, ntok, nbytes, counts, each)
