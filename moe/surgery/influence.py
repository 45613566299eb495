"""Block Influence (ShortGPT, Men et al. 2024): how much a block changes the residual stream.

    BI_i = 1 - mean over tokens of cos(x_in_i, x_out_i)

x_in_i is block i's input hidden state and x_out_i its output (after both residual adds). A block
whose output points where its input did (BI near 0) does little and is the first to delete.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from moe.model.transformer import Transformer


@torch.no_grad()
def block_influence(model: Transformer, batches: Iterable) -> list[float]:
    """Per-layer BI over every token of `batches`.

    Each batch is an input_ids tensor (B, L), or a dict with "input_ids" and optionally
    "domain": what `Transformer.forward` takes as `domain` (expert ids for a domain-routed MoE).
    """
    L = len(model.layers)
    sums = torch.zeros(L, dtype=torch.float64)
    count = 0
    pending: dict[int, torch.Tensor] = {}

    def pre_hook(i):
        def fn(module, args, kwargs):
            pending[i] = args[0].detach()  # (B, L, D)

        return fn

    def post_hook(i):
        def fn(module, args, kwargs, out):
            cos = F.cosine_similarity(pending.pop(i).double(), out.detach().double(), dim=-1)
            sums[i] += cos.sum()  # (B, L) summed

        return fn

    handles = []
    for i, layer in enumerate(model.layers):
        handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook(i), with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            ids, dom = (b["input_ids"], b.get("domain")) if isinstance(b, dict) else (b, None)
            model(ids, domain=dom, last_logits_only=True)
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError("block_influence: no calibration tokens")
    return (1.0 - sums / count).tolist()
