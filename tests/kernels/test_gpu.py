"""GPU tests (marked gpu; skipped without CUDA): the triton and torch backends in bf16, fp16
and fp32 against the float64 per-token reference, determinism, and no host sync.

Tolerances per dtype, relative to each tensor's max magnitude (see assert_close): bf16 has an
8-bit mantissa (rel. step 2^-8 = 3.9e-3) and the layer chains three matmuls plus SwiGLU with
bf16 intermediates, so 3e-2; fp16 (2^-11) 5e-3; fp32 (IEEE dot, fp32 accumulate) 1e-4.
"""

from __future__ import annotations

import moe_kernels as mk
import pytest
import torch
from _kernels_cases import CASES, check_backend_case, check_deterministic, make_problem

pytestmark = pytest.mark.gpu

RTOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_backend_gpu(case, dtype):
    check_backend_case(mk.moe_mlp, case, "triton", dtype=dtype, device="cuda", rtol=RTOL[dtype])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_torch_backend_gpu_bf16(case):
    check_backend_case(mk.moe_mlp, case, "torch", dtype=torch.bfloat16, device="cuda",
                       rtol=RTOL[torch.bfloat16])


def test_auto_is_triton_on_cuda():
    params, ids, wts, _ = make_problem(64, 128, 256, 8, 2, "zipf", dtype=torch.bfloat16,
                                       device="cuda")
    a = mk.moe_mlp(*params, ids, wts)
    b = mk.moe_mlp(*params, ids, wts, backend="triton")
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_triton_deterministic_gpu(dtype):
    check_deterministic(mk.moe_mlp, ("big", 1024, 256, 512, 16, 4, "zipf"), "triton",
                        dtype=dtype, device="cuda")


def test_larger_shape_bf16():
    check_backend_case(mk.moe_mlp, ("larger", 256, 512, 1024, 8, 2, "zipf"), "triton",
                       dtype=torch.bfloat16, device="cuda", rtol=RTOL[torch.bfloat16])


def test_routing_kernels_match_torch_gpu():
    logits = torch.randn(4096, 64, device="cuda")
    w, ids = mk.topk_route(logits, 8, backend="triton")
    w_ref, ids_ref = mk.topk_route(logits, 8, backend="torch")
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref)
    p = mk.plan(ids, 64, backend="triton")
    q = mk.plan(ids, 64, backend="torch")
    for name in ("order", "inv", "token", "offsets"):
        assert torch.equal(getattr(p, name), getattr(q, name)), name


def test_triton_path_never_syncs():
    T, D, F, E, K = 512, 256, 512, 8, 2
    params, _, _, dy = make_problem(T, D, F, E, K, "random", dtype=torch.bfloat16,
                                    device="cuda")
    ps = [p.requires_grad_() for p in params]
    logits = torch.randn(T, E, device="cuda")
    for mode in ("warm", "error"):  # the first pass compiles the kernels (which may sync)
        if mode == "error":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            wts, ids = mk.topk_route(logits, K, backend="triton")
            y = mk.moe_mlp(*ps, ids, wts, backend="triton")
            y.backward(dy)
        finally:
            torch.cuda.set_sync_debug_mode(0)
