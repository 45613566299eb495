"""Branch-Train-Merge style ensemble: the branches' next-token distributions, mixed per position
with each branch's posterior given the sequence so far (Li et al. 2022, "Branch-Train-Merge").

For a sequence x and branches e with uniform prior, the weight of branch e at position t is
    w_e(t) ∝ exp(sum_{s<t} log p_e(x_s | x_<s)),
and the ensemble's probability of x_t is sum_e w_e(t) p_e(x_t | x_<t): exact Bayesian model
averaging over the branches, using only the context (no peeking at x_t). Under the rolling
protocol (the default, as `moe eval`), x is a whole held-out document: each branch scores each
token in its window of the document, and the weights use everything before it in the document.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from moe.config import ConfigError, DataConfig
from moe.data.datamodule import DomainDataModule
from moe.eval.rolling import check_protocol, prefix_token, score_documents
from moe.model.loss import bits_per_byte
from moe.model.transformer import IGNORE_INDEX, Transformer


def ensemble_logprobs(token_logprobs_EBL: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    """Per-token log-probabilities of the posterior-weighted mixture: (B, L).

    token_logprobs_EBL: log p_e(target_t) for each branch e; masked positions carry no evidence.
    """
    lp = token_logprobs_EBL.double().masked_fill(~mask_BL.unsqueeze(0), 0.0)  # (E, B, L)
    # evidence before position t: exclusive cumulative sum over time
    seen = torch.cumsum(lp, dim=-1) - lp  # (E, B, L)
    log_w = seen - torch.logsumexp(seen, dim=0, keepdim=True)  # (E, B, L), uniform prior 1/E
    return torch.logsumexp(log_w + lp, dim=0)  # (B, L)


def _rolling_mixture(models: list[Transformer], docs, prefix: int, context: int,
                     stride: int | None, batch_size: int, pad_id: int) -> np.ndarray:  # fmt: skip
    """Each document's NLL (nats) under the ensemble: every member scores every token under the
    rolling protocol (moe.eval.rolling), and the weights use the evidence of the whole document
    before each token (across windows)."""
    per_member = [score_documents(m, docs, prefix, context, stride, batch_size, pad_id,
                                  per_token=True).token_nats for m in models]  # fmt: skip
    out = np.zeros(len(docs), dtype=np.float64)
    for i in range(len(docs)):
        lp = torch.from_numpy(np.stack([-t[i] for t in per_member]))[:, None, :]  # (E, 1, n)
        mask = torch.ones(lp.shape[1:], dtype=torch.bool)
        out[i] = -float(ensemble_logprobs(lp, mask).sum())
    return out


@torch.no_grad()
def evaluate_ensemble(
    models: list[Transformer],
    data: DataConfig,
    seed: int,
    domains: list[str],
    max_batches: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    tokenizer=None,
    heldout_only: frozenset[str] = frozenset(),
    *,
    protocol: str = "rolling",
    context: int | None = None,
    stride: int | None = None,
) -> dict:
    """{"protocol": ..., "domains": {domain: {loss, bpb, tokens, bytes, ...}}} for the
    posterior-weighted ensemble, under `protocol` as moe.eval.evaluate.evaluate_model reads it
    ("rolling": every held-out document whole, `context` default the members' shortest
    max_seq_len; "chunks": `max_batches` packed batches, default 16).
    `tokenizer`: the members' one tokenizer (default `data.tokenizer`, else byte);
    `heldout_only`: domains whose every document is held out (an evaluation set)."""
    if protocol == "rolling":
        ctx = check_protocol(context, stride, None, min(m.config.max_seq_len for m in models),
                             cli=False)  # fmt: skip
    elif protocol == "chunks":
        max_batches = 16 if max_batches is None else max_batches
    else:
        raise ConfigError(f"unknown evaluation protocol {protocol!r} (rolling, chunks)")
    cfg = dataclasses.replace(data, domains=list(domains), stream="mixed", weights={})
    dm = DomainDataModule(cfg, seed=seed, tokenizer=tokenizer, heldout_only=heldout_only)
    dm.setup("validate")
    for m in models:
        m.eval()
    results = {}
    for dom in domains:
        if protocol == "rolling":
            docs = dm.heldout_documents(dom)
            per_doc = _rolling_mixture(models, docs, prefix_token(dm.tokenizer)[0], ctx, stride,
                                       batch_size, dm.tokenizer.pad_id)  # fmt: skip
            ntok = [len(t) for t, _ in docs]
            nb = [b for _, b in docs]
            nats, toks, nbytes = float(per_doc.sum()), sum(ntok), sum(nb)
            results[dom] = {"loss": nats / max(toks, 1), "bpb": bits_per_byte(nats, nbytes),
                            "tokens": toks, "bytes": nbytes, "documents": len(docs),
                            "documents_total": len(docs),
                            "per_document": {"nats": per_doc.tolist(), "tokens": ntok,
                                             "bytes": nb}}  # fmt: skip
            continue
        nats, toks, nbytes = 0.0, 0, 0
        loader = dm.heldout_loader(dom, batch_size=batch_size, max_batches=max_batches)
        for batch in tqdm(loader, desc=f"ensemble {dom}", leave=False, disable=not progress):
            tgt = batch["targets"]
            mask = tgt != IGNORE_INDEX
            safe = tgt.clamp(min=0)
            lps = []
            for m in models:
                logp = F.log_softmax(m(batch["input_ids"]).logits.double(), dim=-1)
                lps.append(logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1))  # (B, L)
            mix = ensemble_logprobs(torch.stack(lps), mask)
            nats -= float(mix[mask].sum())
            toks += int(mask.sum())
            nbytes += int(batch["target_bytes"].sum())
        results[dom] = {
            "loss": nats / max(toks, 1),
            "bpb": bits_per_byte(nats, nbytes),
            "tokens": toks,
            "bytes": nbytes,
        }
    if protocol == "rolling":
        n = sum(r["documents"] for r in results.values())
        desc = {"kind": "rolling", "context": ctx, "stride": stride,
                "prefix": prefix_token(dm.tokenizer)[1], "documents": n, "documents_total": n,
                "sampled": False, "max_docs": None}  # fmt: skip
    else:
        desc = {"kind": "chunks", "seq_len": cfg.seq_len, "batch_size": batch_size,
                "max_batches": max_batches, "sampled": max_batches != 0}  # fmt: skip
    return {"protocol": desc, "domains": results}
