"""NearSwap: take the other model's value where it is already near the base's.

alchemonaut 2024, "QuartetAnemoi-70B-t0.0001" (Hugging Face model card); mergekit's `nearswap`.
With base a and the one model b, per entry:

    w      = clamp(t / max(|a - b|, 1e-6), 0, 1)
    merged = w · b + (1 - w) · a
so entries closer than t are swapped in whole (w = 1), farther ones pulled in proportionally.
`t` (required) is the similarity threshold, in the weights' units. Weights are not used.
"""

from __future__ import annotations

import torch

from moe.merge.registry import MethodParams, register, task_vectors


def check_t(c, bad) -> None:
    if c.parameters.t is None:
        raise bad("parameters.t: nearswap needs t (the similarity threshold, e.g. 0.0001)")


@register("nearswap", needs_base=True, normalize_default=False, n_models=(1, 1),
          uses_weight=False, check=check_t)  # fmt: skip
def nearswap(
    base: torch.Tensor | None, tensors: list[torch.Tensor], p: MethodParams
) -> torch.Tensor:
    (delta,) = task_vectors(base, tensors)  # b - a
    w = (p.t / delta.abs().clamp(min=1e-6)).clamp(0.0, 1.0)
    return base + w * delta  # = w·b + (1 - w)·a
