"""DARE: drop each delta entry with probability 1 − density and rescale survivors by 1/density.

Yu et al. 2024, "Language Models are Super Mario" (arXiv:2311.03099). E[δ̃] = δ entry by entry,
so the expected update is unchanged; the variance grows as density falls. The mask comes from
the generator the caller seeds (per tensor and per replica/round), so a run is reproducible.
"""

from __future__ import annotations

import torch

from moe.delta.registry import Coded, register


@register("dare", "structure", "float", "Yu et al. 2024, arXiv:2311.03099")
def dare(delta: torch.Tensor, density: float, gen: torch.Generator | None = None) -> Coded:
    flat = delta.reshape(-1)
    keep = torch.rand(flat.shape, generator=gen, dtype=torch.float64) < density  # (numel,)
    idx = keep.nonzero().reshape(-1)  # (k,) ascending
    return Coded("sparse", tuple(delta.shape), {"v": flat[idx] / density}, idx,
                 {"density": density})
