"""Branch-Train-Merge style ensemble: the branches' next-token distributions, mixed per position
with each branch's posterior given the sequence so far (Li et al. 2022, "Branch-Train-Merge").

For a sequence x and branches e with uniform prior, the weight of branch e at position t is
    w_e(t) ∝ exp(sum_{s<t} log p_e(x_s | x_<s)),
and the ensemble's probability of x_t is sum_e w_e(t) p_e(x_t | x_<t): exact Bayesian model
averaging over the branches, using only the context (no peeking at x_t).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from tqdm import tqdm

from moe.config import DataConfig
from moe.data.datamodule import DomainDataModule
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


@torch.no_grad()
def evaluate_ensemble(
    models: list[Transformer],
    data: DataConfig,
    seed: int,
    domains: list[str],
    max_batches: int = 16,
    batch_size: int = 8,
    progress: bool = True,
    tokenizer=None,
    heldout_only: frozenset[str] = frozenset(),
) -> dict:
    """{"domains": {domain: {loss, bpb, tokens, bytes}}} for the posterior-weighted ensemble.
    `tokenizer`: the members' one tokenizer (default `data.tokenizer`, else byte);
    `heldout_only`: domains whose every document is held out (an evaluation set)."""
    cfg = dataclasses.replace(data, domains=list(domains), stream="mixed", weights={})
    dm = DomainDataModule(cfg, seed=seed, tokenizer=tokenizer, heldout_only=heldout_only)
    dm.setup("validate")
    for m in models:
        m.eval()
    results = {}
    for dom in domains:
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
    return {"domains": results}
