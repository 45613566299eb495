"""SCE (select, calculate, erase): variance-selected task vectors, energy weights, sign erase.

Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models" (arXiv:2408.07990); mergekit's
`sce`. With δ_i = θ_i - base (M models):

    select     select_topk < 1: keep the k = ⌊select_topk · #{var ≠ 0}⌋ positions of largest
               var_i(δ_i) (population variance over the models; equal values: the earlier
               position), zero every δ_i elsewhere (k = 0: all)
    calculate  w_i = mean(δ_i²) / Σ_j mean(δ_j²)   (1/M each when that sum is below 1e-6)
    erase      γ = +1 where Σ_i δ_i ≥ 0 else -1;  m_i = [sign δ_i = γ]
    merged   = base + Σ_i w_i m_i δ_i / max(Σ_i w_i m_i, 1e-6)
Its coefficients are its own: weight and lambda are not used.
"""

from __future__ import annotations

import torch

from moe.merge.registry import MethodParams, Param, register, task_vectors


def select_mask(deltas: list[torch.Tensor], topk: float) -> torch.Tensor:
    """Bool mask of the positions kept by the variance selection."""
    stack = torch.stack(deltas)  # (M, ...)
    var = stack.var(dim=0, unbiased=False).reshape(-1)
    k = int(int(torch.count_nonzero(var)) * topk)
    mask = torch.zeros(var.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.sort(var, descending=True, stable=True).indices
        mask[order[:k]] = True
    return mask.view_as(deltas[0])


@register("sce", needs_base=True, normalize_default=False, uses_weight=False,
          params=(Param("select_topk", 1.0, lambda k: 0.0 < k <= 1.0, "in (0, 1]"),))  # fmt: skip
def sce(base: torch.Tensor | None, tensors: list[torch.Tensor], p: MethodParams) -> torch.Tensor:
    deltas = task_vectors(base, tensors)
    topk = float(p.get("select_topk", 1.0))
    if topk < 1.0:
        keep = select_mask(deltas, topk)
        deltas = [torch.where(keep, d, torch.zeros_like(d)) for d in deltas]
    energy = [float((d * d).mean()) for d in deltas]
    total = sum(energy)
    w = [1.0 / len(deltas)] * len(deltas) if abs(total) < 1e-6 else [e / total for e in energy]
    summed = torch.zeros_like(deltas[0])
    for d in deltas:
        summed += d
    elected = torch.where(summed >= 0, 1.0, -1.0).to(summed.dtype)
    num, den = torch.zeros_like(summed), torch.zeros_like(summed)
    for d, wi in zip(deltas, w):
        agree = (torch.sign(d) == elected).to(d.dtype)
        num += wi * agree * d
        den += wi * agree
    return base + num / den.clamp(min=1e-6)
