"""moe_kernels: routing, grouped GEMM and the MoE SwiGLU layer, in Triton and torch.

Lives in kernels/moe_kernels/ (nothing importable named `kernels` sits at the repository root:
that name belongs to a Hugging Face package transformers imports). Importing
it never requires triton; the 'triton' backend raises a clear error where it cannot run.
"""

from ._common import HAS_TRITON, INTERPRET
from .grouped_gemm import grouped_mm
from .moe_mlp import clear_cpu_workspace, moe_mlp
from .routing import Plan, plan, topk_route

__all__ = [
    "HAS_TRITON", "INTERPRET", "Plan", "clear_cpu_workspace", "grouped_mm", "moe_mlp", "plan",
    "topk_route",
]
