"""moe_kernels: routing, grouped GEMM and the MoE SwiGLU layer, in Triton and torch.

Lives in kernels/moe_kernels/ (nothing importable named `kernels` sits at the repository root:
that name belongs to a Hugging Face package transformers imports). Importing
it never requires triton; the 'triton' backend raises a clear error where it cannot run.

Shape legend, the one used by moe_kernels and moe.model (moe_layer.py, transformer.py,
loss.py): a tensor's suffix names its dims in order (x_TD is (T, D), w1_EDF is (E, D, F)).
    B    batch (sequences)
    L    sequence length: positions per sequence in one forward call
    P    past positions held in a KV cache (a call's queries attend to P + L keys/values)
    T    tokens: the rows of a flattened batch (T = B*L), as the FFN, router and kernels see them
    D    model dim
    V    vocabulary
    H    attention heads; Hkv key/value heads; Dh head dim
    F    FFN hidden dim: a dense FFN's, or each expert's in the MoE layer; Fs a shared expert's
    E    experts; E1 = E + 1 (expert offsets)
    K    experts per token (top-k)
    N    (token, expert) assignments, N = T*K: the rows of a grouped operand; an activation
         with an N dim (h1_NF, o_ND) has its rows in expert-sorted order
    M    rows of a grouped GEMM's input when they differ from its N output rows: with a
         gather index, row r reads x[gather[r]] of x_MD (M = T for the layer's x)
    C    chunks of assignments (one triton program each in the routing kernels)
    S    ways the dW reduction over an expert's rows is split (grouped_gemm)
Other dims carry a subscript (Tc positions per chunk, Vb rows of a vocabulary block). Triton
tile sizes keep GEMM names: BLOCK_M/BLOCK_N/BLOCK_K are the rows, output columns and reduced
dim of a tile, not the letters above. In grouped_gemm, D and F are a GEMM's input and output
dims in general (h = x @ w1 maps D to F; o = a @ w2, F to D).
"""

from ._common import HAS_TRITON, INTERPRET
from .grouped_gemm import grouped_mm
from .moe_mlp import clear_cpu_workspace, moe_mlp
from .routing import Plan, plan, topk_route

__all__ = [
    "HAS_TRITON", "INTERPRET", "Plan", "clear_cpu_workspace", "grouped_mm", "moe_mlp", "plan",
    "topk_route",
]
