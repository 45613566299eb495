"""Passthrough: the one model's tensor, unchanged (mergekit's `passthrough`).

With `slices:` it stacks layers: each slice names one model's layer range and the output's
layers are the slices' layers in order (e.g. SOLAR's depth up-scaling: layers 0-24 then 8-32 of
the same model), see moe/merge/slices.py. With `models:` it copies its single model.
"""

from __future__ import annotations

import torch

from moe.merge.registry import MethodParams, register


@register("passthrough", needs_base=False, normalize_default=False, exactly_one=True)
def passthrough(base: torch.Tensor | None, tensors: list[torch.Tensor], p: MethodParams
                ) -> torch.Tensor:  # fmt: skip
    return tensors[0].clone()
