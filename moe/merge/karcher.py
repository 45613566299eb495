"""Karcher mean: the Riemannian (Fréchet) mean of the models' directions on the unit sphere.

Karcher 1977, "Riemannian center of mass and mollifier smoothing" (Comm. Pure Appl. Math.);
mergekit's `karcher`. With N models, n_i = |θ_i|, u_i = θ_i / n_i, equal weights a = 1/N over
the models with n_i > tol (renormalised over those):

    u    ← Σ a u_i / |Σ a u_i|   (u_1 if that norm is below tol)
    repeat max_iter times:
        T = Σ a θ_i/sin θ_i (u_i - cos θ_i u)   over i with θ_i = arccos(u · u_i) ≥ tol
        stop if |T| < tol;   u ← cos|T| u + sin|T| T/|T|, renormalised
    merged = ((1/N) Σ_i n_i) u
One model: that model; every norm below tol: zeros. Weights and base_model are not used.
"""

from __future__ import annotations

import math

import torch

from moe.merge.registry import MethodParams, Param, register

PARAMS = (
    Param("max_iter", 10, lambda n: n >= 1, "at least 1"),
    Param("tol", 1e-5, lambda t: t > 0.0, "above 0"),
)


def karcher_tensors(ts: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    if len(ts) == 1:
        return ts[0].clone()
    dtype, shape = ts[0].dtype, ts[0].shape
    flat = [t.double().reshape(-1) for t in ts]
    norms = [float(v.norm()) for v in flat]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(ts[0])
    a = 1.0 / len(valid)
    units = [flat[i] / norms[i] for i in valid]
    u = sum(a * v for v in units)
    nu = float(u.norm())
    u = units[0].clone() if nu < tol else u / nu
    for _ in range(max_iter):
        step = torch.zeros_like(u)
        for v in units:
            dot = max(-1.0, min(1.0, float(u @ v)))
            theta = math.acos(dot)
            if theta < tol:
                continue
            step += a * theta / math.sin(theta) * (v - dot * u)
        ns = float(step.norm())
        if ns < tol:
            break
        u = math.cos(ns) * u + math.sin(ns) * step / ns
        nu = float(u.norm())
        if nu > tol:
            u = u / nu
    return (sum(norms) / len(ts) * u).reshape(shape).to(dtype)


@register("karcher", needs_base=False, normalize_default=False, uses_weight=False, params=PARAMS)
def karcher(
    base: torch.Tensor | None, tensors: list[torch.Tensor], p: MethodParams
) -> torch.Tensor:
    return karcher_tensors(tensors, int(p.get("max_iter", 10)), float(p.get("tol", 1e-5)))
