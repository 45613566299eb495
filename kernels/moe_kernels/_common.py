"""Shared helpers: optional triton import, interpreter detection, backend checks.

`import moe_kernels` must work where triton is not installed (macOS, CPU-only wheels), so
every module imports triton through here and defines its kernels only when HAS_TRITON.
"""

from __future__ import annotations

import os

import torch

from ._launch import recording

# TRITON_INTERPRET has to be set before triton is imported; read it once, at import, like
# triton does. Under the interpreter kernels run on CPU tensors, with the small tiles the
# config functions return for arch None (see _launch.device_arch).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:  # pragma: no cover - depends on the platform
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # ImportError, or a broken install that fails while importing
    triton = None
    tl = None
    HAS_TRITON = False


def triton_usable(t: torch.Tensor) -> bool:
    """True when a triton kernel can run on tensor t (CUDA, or CPU under the interpreter;
    meta tensors while launches are recorded, see _launch.record_launches)."""
    return HAS_TRITON and (t.is_cuda or (INTERPRET and t.device.type == "cpu")
                           or (recording() and t.device.type == "meta"))


def require_triton(t: torch.Tensor, what: str) -> None:
    """Raise a clear error when the triton backend was asked for but cannot run on t."""
    if not HAS_TRITON:
        raise RuntimeError(
            f"{what}: backend 'triton' needs the triton package, which is not installed; "
            "use backend='torch'"
        )
    if not triton_usable(t):
        raise ValueError(
            f"{what}: backend 'triton' needs CUDA tensors (got a tensor on {t.device}); "
            "use backend='torch' on CPU, or set TRITON_INTERPRET=1 before importing triton "
            "to run the kernels in the (slow) interpreter"
        )


def resolve_backend(backend: str, t: torch.Tensor, what: str) -> str:
    """Map 'auto' to 'triton' on CUDA (when triton is present), else 'torch'; validate names."""
    if backend not in ("auto", "triton", "torch", "loop"):
        raise ValueError(
            f"{what}: backend must be one of 'auto', 'triton', 'torch', 'loop'; got {backend!r}"
        )
    if backend == "auto":
        return "triton" if (HAS_TRITON and t.is_cuda) else "torch"
    if backend == "triton":
        require_triton(t, what)
    return backend


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
