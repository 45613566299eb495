"""Linear merge: a weighted average of the models' parameters.

Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time" (ICML 2022, arXiv:2203.05482).

    merged = Σ_i w_i θ_i / Σ_i w_i        (normalize: true, the default)
    merged = Σ_i w_i θ_i                  (normalize: false)
"""

from __future__ import annotations

import torch

from moe.merge.registry import MethodParams, register, weighted_sum


@register("linear", needs_base=False, normalize_default=True)
def linear(base: torch.Tensor | None, tensors: list[torch.Tensor], p: MethodParams) -> torch.Tensor:
    out = weighted_sum(tensors, p.weights)
    if p.normalize:
        out /= sum(p.weights)
    return out
