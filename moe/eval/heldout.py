"""Held-out bits per byte of every domain, on batches read once and reused at every evaluation
(the experiments' learning curves: moe/experiments/init, surgery, prune, fleet)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe.data.datamodule import DomainDataModule
from moe.model.loss import bits_per_byte
from moe.model.transformer import IGNORE_INDEX, Transformer


class HeldOut:
    """The held-out batches of every domain, read once and reused at every evaluation."""

    def __init__(self, dm: DomainDataModule, domains: list[str], batches: int, batch_size: int):
        self.domains = list(domains)
        self.batches = {d: list(dm.heldout_loader(d, batch_size, batches)) for d in domains}

    @torch.no_grad()
    def bpb(self, model: Transformer) -> dict[str, float]:
        """{domain: bpb, ..., "mean": the mean over the domains}; the model's mode is kept."""
        was = model.training
        model.eval()
        out = {}
        for d, bs in self.batches.items():
            nats, nbytes = 0.0, 0
            for b in bs:
                logits = model(b["input_ids"]).logits  # (B, L, V)
                nats += float(F.cross_entropy(logits.float().flatten(0, 1), b["targets"].flatten(),
                                              ignore_index=IGNORE_INDEX, reduction="sum"))
                nbytes += int(b["target_bytes"].sum())
            out[d] = bits_per_byte(nats, nbytes)
        out["mean"] = sum(out[d] for d in self.domains) / len(self.domains)
        model.train(was)
        return out
