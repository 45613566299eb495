"""Multi-SLERP: a weighted spherical mean of N models (or of their task vectors).

Goddard 2025, "Multi-SLERP" (goddard.blog); mergekit's `multislerp`: barycentric interpolation
on the hypersphere through the tangent space at the weighted mean. With v_i = θ_i (or θ_i - base
when base_model is given), weights w_i (÷ Σ w_i with normalize_weights: true, the default):

    u_i = v_i / (|v_i| + eps),   m = Σ w_i u_i / |Σ w_i u_i|
    τ   = Σ w_i (u_i - (u_i · m) m),   |τ|' = |τ| + eps
    merged = (Σ w_i |v_i|) (cos |τ|' m + sin |τ|' τ / |τ|')   (+ base)
One model: that model. When |Σ w_i u_i| < eps: two models interpolate linearly, Σ w_i v_i
(+ base); more models cannot be merged (opposite directions cancel) and the merge stops.
"""

from __future__ import annotations

import torch

from moe.config import ConfigError
from moe.merge.registry import MethodParams, Param, register

PARAMS = (
    Param("normalize_weights", True),
    Param("eps", 1e-8, lambda e: e > 0.0, "above 0"),
)


def multislerp_tensors(vs: list[torch.Tensor], weights: list[float], eps: float = 1e-8,
                       name: str = "") -> torch.Tensor:  # fmt: skip
    """The spherical weighted mean of `vs` (weights used as given)."""
    dtype, shape = vs[0].dtype, vs[0].shape
    flat = torch.stack([v.double().reshape(-1) for v in vs])  # (M, n)
    w = torch.tensor(weights, dtype=torch.float64).unsqueeze(-1)  # (M, 1)
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (w * units).sum(dim=0)
    mn = mean.norm()
    if mn < eps:
        if len(vs) == 2:
            return (w * flat).sum(dim=0).reshape(shape).to(dtype)
        raise ConfigError(f"multislerp: tensor {name}: the weighted mean of the models' directions "
                          "is zero (opposite models with balancing weights); change the weights")
    mean = mean / mn
    tangent = (w * (units - (units @ mean).unsqueeze(-1) * mean)).sum(dim=0)
    tn = tangent.norm() + eps
    res = (torch.cos(tn) * mean + torch.sin(tn) / tn * tangent) * (w * norms).sum()
    return res.reshape(shape).to(dtype)


def check_weights(c, bad) -> None:
    """normalize_weights divides by Σ w_i: refuse plain-number weights summing to 0."""
    from moe.merge.gradients import is_scalar

    norm = True if c.parameters.normalize_weights is None else c.parameters.normalize_weights
    if norm and c.models and is_scalar(c.parameters.weight) and all(
            is_scalar(m.parameters.weight) for m in c.models):  # fmt: skip
        if abs(sum(c.weight(i) for i in range(len(c.models)))) < 1e-12:
            raise bad("models[*].parameters.weight: weights sum to 0, cannot normalize_weights")
    if c.slices and c.base_model is not None:
        raise bad("base_model: multislerp with slices: takes no base model (list the models "
                  "as sources)")  # fmt: skip


@register("multislerp", needs_base=False, normalize_default=False, params=PARAMS,
          check=check_weights)  # fmt: skip
def multislerp(
    base: torch.Tensor | None, tensors: list[torch.Tensor], p: MethodParams
) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0].clone()
    w = list(p.weights)
    if bool(p.get("normalize_weights", True)):
        w = [x / sum(w) for x in w]
    eps = float(p.get("eps", 1e-8))
    if base is None:
        return multislerp_tensors(tensors, w, eps, p.name)
    return base + multislerp_tensors([t - base for t in tensors], w, eps, p.name)
