"""Low-rank delta: the best rank-r approximation (truncated SVD) of each 2-D delta tensor.

δ ≈ A @ B with A = U_r diag(S_r) (m, r) and B = V_rᵀ (r, n) (Eckart-Young), as in LoRA-style
delta extraction (e.g. mergekit's extract_lora; Ryu et al. 2023 "Efficient storage of fine-tuned
models via low-rank approximation of weight residuals", arXiv:2305.18425). 1-D tensors (norm
gains) have no rank and stay dense.
"""

from __future__ import annotations

import torch

from moe.config import ConfigError
from moe.delta.registry import Coded, register


@register("lowrank", "structure", "int", "Ryu et al. 2023, arXiv:2305.18425")
def lowrank(delta: torch.Tensor, rank: int, gen: torch.Generator | None = None) -> Coded:
    if delta.ndim != 2:
        return Coded("dense", tuple(delta.shape), {"v": delta.reshape(-1)}, params={"rank": None})
    m, n = delta.shape
    if rank > min(m, n):
        raise ConfigError(f"lowrank:{rank}: rank larger than a ({m}, {n}) delta tensor "
                          f"(at most {min(m, n)})")
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)  # (m, q) (q,) (q, n)
    A = U[:, :rank] * S[:rank]  # (m, r)
    B = Vh[:rank]  # (r, n)
    return Coded("lowrank", (m, n), {"A": A, "B": B}, params={"rank": rank})
