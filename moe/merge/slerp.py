"""Spherical linear interpolation between two models, tensor by tensor.

Shoemake 1985, "Animating rotation with quaternion curves" (SIGGRAPH '85); applied to model
weights as in mergekit and Lerp/SLERP model-merging practice. With Ω the angle between the two
flattened tensors:

    merged = sin((1-t)Ω)/sin Ω · θ_0 + sin(tΩ)/sin Ω · θ_1
t = 0 gives the first model, t = 1 the second. When the tensors are (nearly) parallel or one is
zero, sin Ω ≈ 0 and the formula is ill-conditioned, so it falls back to linear interpolation.
"""

from __future__ import annotations

import math

import torch

from moe.merge.registry import MethodParams, register

# |cos Ω| above this: treat as parallel and interpolate linearly (mergekit uses the same bound)
DOT_THRESHOLD = 0.9995


def lerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    return (1 - t) * v0 + t * v1


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    na, nb = a.norm(), b.norm()
    if na < eps or nb < eps:
        return lerp(t, v0, v1)
    dot = float((a / na) @ (b / nb))
    if abs(dot) > DOT_THRESHOLD:
        return lerp(t, v0, v1)
    omega = math.acos(max(-1.0, min(1.0, dot)))
    s = math.sin(omega)
    c0, c1 = math.sin((1 - t) * omega) / s, math.sin(t * omega) / s
    return (c0 * v0.double() + c1 * v1.double()).to(v0.dtype)


@register("slerp", needs_base=False, normalize_default=False, exactly_two=True)
def slerp(base: torch.Tensor | None, tensors: list[torch.Tensor], p: MethodParams) -> torch.Tensor:
    v0, v1 = tensors
    return slerp_tensors(p.t, v0, v1)
