"""DARE: drop each delta entry with probability 1 − density and rescale survivors by 1/density.

Yu et al. 2024, "Language Models are Super Mario" (arXiv:2311.03099). E[δ̃] = δ entry by entry,
so the expected update is unchanged; the variance grows as density falls. The mask comes from
the generator the caller seeds (per tensor and per replica/round), so a run is reproducible.
"""

from __future__ import annotations

import torch

from moe.delta.primitives import dare_keep_mask
from moe.delta.registry import Coded, register


@register("dare", "structure", "float", "Yu et al. 2024, arXiv:2311.03099")
def dare(delta: torch.Tensor, density: float, gen: torch.Generator | None = None) -> Coded:
    flat = delta.reshape(-1)
    keep = dare_keep_mask(flat.shape, density, gen, torch.float64)  # (numel,) float64 draws
    idx = keep.nonzero().reshape(-1)  # (k,) ascending
    return Coded("sparse", tuple(delta.shape), {"v": flat[idx] / density}, idx,
                 {"density": density})
