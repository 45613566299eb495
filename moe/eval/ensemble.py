"""Branch-Train-Merge style ensemble: the branches' next-token distributions, mixed per position
with each branch's posterior given the sequence so far (Li et al. 2022, "Branch-Train-Merge").

For a sequence x and branches e with uniform prior, the weight of branch e at position t is
    w_e(t) ∝ exp(sum_{s<t} log p_e(x_s | x_<s)),
and the ensemble's probability of x_t is sum_e w_e(t) p_e(x_t | x_<t): exact Bayesian model
averaging over the branches, using only the context (no peeking at x_t). Under the rolling
protocol (the default, as `moe eval`), x is a whole held-out document: each branch scores each
token in its window of the document, and the weights use everything before it in the document.

`route="centroid"` is c-BTM's top-1 routing (Gururangan et al. 2023) with the domains as its
clusters: each token is predicted by the one branch whose domain's tf-idf centroid is nearest,
in cosine similarity, to the tf-idf vector of the context before it (`centroids`). The router
costs a lookup per token, so the ensemble's inference is one branch's; before any context (a
document's first token) it takes the first branch.
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


def centroids(train_tokens: list[np.ndarray], vocab_size: int, window: int = 512) -> np.ndarray:
    """(E, V): c-BTM's router in tf-idf space, with each domain as a cluster: row e is domain e's
    training-token frequencies weighted by idf and scaled to unit length, times idf again (the
    context's counts are idf-weighted too), so that a context's cosine similarity to centroid e
    is, up to a factor common to every e, the sum over its tokens x of row e at x.
    idf = log(N / df), with N the `window`-token pieces of every domain's training stream and df
    the pieces a token occurs in (at least 1): a token found in every piece (a space) weighs
    nothing, rarer ones more."""
    df = np.zeros(vocab_size, dtype=np.float64)
    n_pieces = 0
    tf = []
    for toks in train_tokens:
        t = np.asarray(toks, dtype=np.int64)
        tf.append(np.bincount(t, minlength=vocab_size)[:vocab_size].astype(np.float64))
        n = max(1, len(t) // window)
        for piece in np.array_split(t, n):
            df[np.unique(piece)] += 1
        n_pieces += n
    idf = np.log(n_pieces / np.maximum(df, 1.0))
    out = np.stack([f * idf for f in tf])
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out * idf


def centroid_routes(tokens: np.ndarray, cent: np.ndarray) -> np.ndarray:
    """(n,): the branch each position's token is predicted by: the centroid with the largest
    cosine similarity to the context before it, `cent` as `centroids` makes it (the context
    vector's norm is the same for every branch, so only the dot products are compared); ties go
    to the lower index."""
    score = cent[:, np.asarray(tokens, dtype=np.int64)]  # (E, n): centroid weight of each token
    seen = np.cumsum(score, axis=1) - score  # exclusive: the context before position t
    return seen.argmax(axis=0)


def _rolling_mixture(models: list[Transformer], docs, prefix: int, context: int,
                     stride: int | None, batch_size: int, pad_id: int,
                     cent: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Each document's NLL (nats) under the ensemble: every member scores every token under the
    rolling protocol (moe.eval.rolling), and the weights use the evidence of the whole document
    before each token (across windows); with `cent`, top-1 routing by centroid instead."""
    per_member = [score_documents(m, docs, prefix, context, stride, batch_size, pad_id,
                                  per_token=True).token_nats for m in models]  # fmt: skip
    out = np.zeros(len(docs), dtype=np.float64)
    for i in range(len(docs)):
        nats = np.stack([t[i] for t in per_member])  # (E, n)
        if cent is not None:
            route = centroid_routes(docs[i][0], cent)
            out[i] = float(nats[route, np.arange(nats.shape[1])].sum())
            continue
        lp = torch.from_numpy(-nats)[:, None, :]  # (E, 1, n)
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
    route: str = "posterior",
    route_domains: list[str] | None = None,
) -> dict:
    """{"protocol": ..., "domains": {domain: {loss, bpb, tokens, bytes, ...}}} for the
    posterior-weighted ensemble, under `protocol` as moe.eval.evaluate.evaluate_model reads it
    ("rolling": every held-out document whole, `context` default the members' shortest
    max_seq_len; "chunks": `max_batches` packed batches, default 16).
    `tokenizer`: the members' one tokenizer (default `data.tokenizer`, else byte);
    `heldout_only`: domains whose every document is held out (an evaluation set).
    `route`: "posterior" (BTM's mixture) or "centroid" (c-BTM top-1; `route_domains` names
    each member's domain, whose training tokens make its centroid)."""
    if route not in ("posterior", "centroid"):
        raise ConfigError(f"unknown ensemble routing {route!r} (posterior, centroid)")
    if route == "centroid" and (route_domains is None or len(route_domains) != len(models)):
        raise ConfigError("centroid routing needs one domain per ensemble member")
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
    cent = None
    if route == "centroid":
        rdm = DomainDataModule(dataclasses.replace(data, domains=list(route_domains),
                                                   stream="mixed", weights={}),
                               seed=seed, tokenizer=dm.tokenizer)  # fmt: skip
        rdm.setup("validate")
        cent = centroids([rdm.tokens(d).train for d in route_domains],
                         models[0].config.vocab_size)  # fmt: skip
    results = {}
    for dom in domains:
        if protocol == "rolling":
            docs = dm.heldout_documents(dom)
            per_doc = _rolling_mixture(models, docs, prefix_token(dm.tokenizer)[0], ctx, stride,
                                       batch_size, dm.tokenizer.pad_id, cent)  # fmt: skip
            ntok = [len(t) for t, _ in docs]
            nb = [b for _, b in docs]
            nats, toks, nbytes = float(per_doc.sum()), sum(ntok), sum(nb)
            results[dom] = {"loss": nats / max(toks, 1), "bpb": bits_per_byte(nats, nbytes),
                            "tokens": toks, "bytes": nbytes, "documents": len(docs),
                            "documents_total": len(docs),
                            "per_document": {"nats": per_doc.tolist(), "tokens": ntok,
                                             "bytes": nb}}  # fmt: skip
            if cent is not None and dom in route_domains:
                # the router's own accuracy: the share of this domain's tokens it sends to the
                # branch of this domain
                right = sum(int((centroid_routes(t, cent) == route_domains.index(dom)).sum())
                            for t, _ in docs)  # fmt: skip
                results[dom]["route_accuracy"] = right / max(toks, 1)
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
            if cent is None:
                mix = ensemble_logprobs(torch.stack(lps), mask)
            else:  # top-1 by centroid: each position's context is the chunk up to its input
                ids = batch["input_ids"].numpy()
                # the input at t is the context's last token: counts include it
                routes = np.stack([
                    np.cumsum(cent[:, row], axis=1).argmax(axis=0) for row in ids])
                stacked = torch.stack(lps)  # (E, B, L)
                mix = stacked.gather(0, torch.from_numpy(routes)[None]).squeeze(0)
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
