"""NuSLERP: slerp of two models (or of their task vectors) with weights, whole or per row.

Shoemake 1985 (SIGGRAPH '85) applied as mergekit's `nuslerp`. Two models with weights w_0, w_1:
t = w_1 / (w_0 + w_1) (0.5 when |w_0 + w_1| < 1e-6). Without base_model v_k = θ_k and
merged = S(v_0, v_1); with it v_k = θ_k - base and merged = base + S(v_0, v_1), where per vector

    Ω = arccos(clamp(û_0 · û_1, -1, 1)),  û = v / max(|v|, 1e-7)
    S = (sin((1-t)Ω) v_0 + sin(tΩ) v_1) / sin Ω,   linear (1-t) v_0 + t v_1 where |sin Ω| < 1e-8
The vectors: the whole flattened tensor (nuslerp_flatten: true, the default); else each vector
along the last dim, or along dim 0 with nuslerp_row_wise: true.
"""

from __future__ import annotations

import torch

from moe.merge.registry import MethodParams, Param, register

PARAMS = (Param("nuslerp_flatten", True), Param("nuslerp_row_wise", False))


def nuslerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, flatten: bool = True,
                    row_wise: bool = False, eps: float = 1e-8) -> torch.Tensor:  # fmt: skip
    shape, dtype = v0.shape, v0.dtype
    a, b = v0.double(), v1.double()
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    ua = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    omega = torch.acos((ua * ub).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0))
    s = torch.sin(omega)
    colinear = s.abs() < eps
    sph = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.where(
        colinear, torch.ones_like(s), s)  # fmt: skip
    res = torch.where(colinear, (1 - t) * a + t * b, sph)
    if not flatten and row_wise:
        res = res.transpose(0, -1)
    return res.reshape(shape).to(dtype)


def check_slices(c, bad) -> None:
    if c.slices and c.base_model is not None:
        raise bad("base_model: nuslerp with slices: takes no base model (list the two models "
                  "as sources)")  # fmt: skip


@register("nuslerp", needs_base=False, normalize_default=False, n_models=(2, 2), params=PARAMS,
          check=check_slices)  # fmt: skip
def nuslerp(
    base: torch.Tensor | None, tensors: list[torch.Tensor], p: MethodParams
) -> torch.Tensor:
    w0, w1 = p.weights
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    flat, rows = bool(p.get("nuslerp_flatten", True)), bool(p.get("nuslerp_row_wise", False))
    v0, v1 = tensors
    if base is None:
        return nuslerp_tensors(t, v0, v1, flat, rows)
    return base + nuslerp_tensors(t, v0 - base, v1 - base, flat, rows)
