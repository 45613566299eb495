"""Model Stock: interpolate between the base and the models' mean by their task vectors' angle.

Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models" (ECCV 2024,
arXiv:2403.19522); mergekit's `model_stock`. With N ≥ 2 models, δ_i = θ_i - base, and cos the
mean over pairs i < j of the cosine between δ_i and δ_j (its denominator |δ_i||δ_j| floored at
1e-6, the cosine clamped to [-1, 1]):

    t      = N cos / (1 + (N - 1) cos)
    merged = t · (1/N) Σ_i θ_i + (1 - t) · base
filter_wise: false (default) takes one cos for the whole tensor; true one per row (the vectors
along the last dim; a 1-D tensor is one row). Weights are not used: t is the model's own.
"""

from __future__ import annotations

import torch

from moe.merge.registry import MethodParams, Param, register, task_vectors


def stock_t(deltas: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """t per row (filter_wise, shape (..., 1)) or for the whole tensor (shape (1,))."""
    vs = [d if filter_wise else d.reshape(-1) for d in deltas]
    if filter_wise and vs[0].dim() == 1:
        vs = [v.unsqueeze(0) for v in vs]
    cos = []
    for i in range(len(vs)):
        for j in range(i + 1, len(vs)):
            den = (vs[i].norm(dim=-1) * vs[j].norm(dim=-1)).clamp(min=1e-6)
            cos.append(((vs[i] * vs[j]).sum(dim=-1) / den).clamp(-1.0, 1.0))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(vs)
    return n * c / (1 + (n - 1) * c)


@register("model_stock", needs_base=True, normalize_default=False, n_models=(2, None),
          uses_weight=False, params=(Param("filter_wise", False),))  # fmt: skip
def model_stock(
    base: torch.Tensor | None, tensors: list[torch.Tensor], p: MethodParams
) -> torch.Tensor:
    filter_wise = bool(p.get("filter_wise", False))
    t = stock_t(task_vectors(base, tensors), filter_wise)
    mean = sum(tensors) / len(tensors)
    if filter_wise and base.dim() == 1:
        t = t.squeeze(0)  # the one row's t, shape (1,)
    return t * mean + (1 - t) * base
