"""DARE: drop each task-vector entry with probability 1 - density and rescale the rest by 1/density.

Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch" (ICML 2024, arXiv:2311.03099). Two variants, as in mergekit:

    dare_linear  merged = base + λ Σ_i w_i δ̃_i   (÷ Σ_i w_i with normalize: true)
    dare_ties    δ̃_i then TIES' sign election and disjoint mean (Yadav et al. 2023)
with δ̃_i = δ_i ⊙ Bernoulli(density_i) / density_i, so E[δ̃_i] = δ_i.

The mask of model i on tensor `name` comes from a generator seeded by (seed, name, i): the same
seed gives the same merge whatever order tensors are visited in.
"""

from __future__ import annotations

import torch

from moe.delta.primitives import dare_keep_mask
from moe.merge.registry import (
    MethodParams,
    linear_combination,
    register,
    task_vectors,
    tensor_generator,
)
from moe.merge.ties import elect_and_merge


def drop_and_rescale(delta: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    if density >= 1.0:
        return delta.clone()
    keep = dare_keep_mask(delta.shape, density, gen)  # default float dtype, the tensor's shape
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def _dropped(base: torch.Tensor | None, tensors: list[torch.Tensor], p: MethodParams):
    return [
        drop_and_rescale(d, rho, tensor_generator(p.seed, p.name, i))
        for i, (d, rho) in enumerate(zip(task_vectors(base, tensors), p.densities))
    ]


@register("dare_linear", needs_base=True, normalize_default=False, uses_density=True)
def dare_linear(
    base: torch.Tensor | None, tensors: list[torch.Tensor], p: MethodParams
) -> torch.Tensor:
    return linear_combination(base, _dropped(base, tensors, p), p)


@register("dare_ties", needs_base=True, normalize_default=True, uses_density=True)
def dare_ties(
    base: torch.Tensor | None, tensors: list[torch.Tensor], p: MethodParams
) -> torch.Tensor:
    return base + p.scale * elect_and_merge(_dropped(base, tensors, p), p.weights, p.normalize)
