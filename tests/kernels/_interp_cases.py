"""Every triton kernel against its torch reference, under the triton interpreter (CPU, fp32).

Not collected by the normal test run (the name does not start with test_): the interpreter
must be switched on before triton is imported, and an out-of-bounds access in a kernel can
kill the process, so test_triton_interpret.py runs this file in a subprocess:

    TRITON_INTERPRET=1 python -m pytest tests/kernels/_interp_cases.py -q

Shapes are small (the interpreter is slow) but awkward: D, F not powers of two, T=1, K=E,
E=1, prime E, empty experts, skewed routing. tl.dot on bf16 is wrong in the interpreter, so
everything here is fp32.
"""

from __future__ import annotations

import moe_kernels as mk
import pytest
import torch
from _kernels_cases import INTERP_CASES, assert_close, check_backend_case, check_deterministic
from moe_kernels import reference as ref
from moe_kernels.grouped_gemm import grouped_dw_triton, grouped_mm_triton
from moe_kernels.moe_mlp import combine_bwd_triton, combine_triton
from moe_kernels.routing import plan_triton, topk_route_triton

if not (mk.INTERPRET and mk.HAS_TRITON):
    pytest.skip("needs TRITON_INTERPRET=1 and triton", allow_module_level=True)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- routing


@pytest.mark.parametrize("T,E,k", [(1, 1, 1), (37, 5, 3), (20, 13, 13), (50, 64, 8), (9, 7, 1)])
@pytest.mark.parametrize("normalize", [True, False])
def test_topk_route_kernel(T, E, k, normalize):
    logits = torch.randn(T, E, generator=_gen(T * E + k))
    logits[: T // 2, : E // 2] = 0.25  # exact ties in half the rows
    w, ids = topk_route_triton(logits, k, normalize)
    w_ref, ids_ref = ref.topk_route_ref(logits, k, normalize)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref.float(), rtol=1e-5, atol=1e-6)


def test_topk_route_kernel_strided_logits():
    logits = torch.randn(20, 12, generator=_gen(3))[:, ::2]  # non-contiguous columns
    w, ids = topk_route_triton(logits, 2)
    w_ref, ids_ref = ref.topk_route_ref(logits, 2)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T,K,E,skew", [(1, 1, 1, False), (33, 3, 7, False), (100, 8, 64, True),
                                        (300, 2, 5, True), (40, 2, 9, False)])
def test_plan_kernel(T, K, E, skew):
    # (300, 2, 5) spans several chunks of the histogram/scatter kernels.
    gen = _gen(T + K + E)
    ids = torch.randint(0, E, (T, K), generator=gen)
    if skew:
        ids = torch.where(torch.rand(T, K, generator=gen) < 0.7, 0, ids)
    p = plan_triton(ids, E)
    order, counts, offsets = ref.plan_ref(ids, E)
    assert torch.equal(p.order, order)
    assert torch.equal(p.counts.long(), counts)
    assert torch.equal(p.offsets, offsets)
    assert torch.equal(p.inv[p.order], torch.arange(T * K))
    assert torch.equal(p.token, order // K)


# --------------------------------------------------------------------------- grouped GEMM


def _offsets(counts):
    return torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32)


@pytest.mark.parametrize("D,F,counts", [(100, 72, [5, 0, 17, 1, 0, 9]), (40, 100, [33]),
                                        (72, 40, [0, 0, 1]), (16, 16, [2, 3])])
@pytest.mark.parametrize("gather", [False, True])
def test_grouped_mm_kernel(D, F, counts, gather):
    gen = _gen(D + F)
    E, N = len(counts), sum(counts)
    offsets = _offsets(counts)
    x = torch.randn(N + 3, D, generator=gen)
    w = torch.randn(E, D, F, generator=gen)
    idx = torch.randint(0, N + 3, (N,), generator=gen)
    if gather:
        y = grouped_mm_triton(x, w, offsets, gather_N=idx)
        xs = x[idx]
    else:
        xs = x[:N]
        y = grouped_mm_triton(xs, w, offsets)
    assert_close(y, ref.grouped_mm_ref(xs.double(), w.double(), offsets), 1e-5)
    # Transposed weights as a strided view (what the backward passes).
    wt = torch.randn(E, F, D, generator=gen).transpose(1, 2)
    assert_close(grouped_mm_triton(xs, wt, offsets),
                 ref.grouped_mm_ref(xs.double(), wt.double(), offsets), 1e-5)


@pytest.mark.parametrize("split", [1, 2, 3])
@pytest.mark.parametrize("gather", [False, True])
def test_grouped_dw_kernel(split, gather):
    gen = _gen(split)
    counts = [5, 0, 40, 1, 0, 9]  # one hot expert, two empty
    D, F = 100, 72
    N = sum(counts)
    offsets = _offsets(counts)
    x = torch.randn(N, D, generator=gen)
    dy = torch.randn(N, F, generator=gen)
    idx = torch.randperm(N, generator=gen)
    dw = grouped_dw_triton(x, dy, offsets, gather_N=idx if gather else None, split=split)
    xs = x[idx] if gather else x
    assert_close(dw, ref.grouped_dw_ref(xs.double(), dy.double(), offsets), 1e-5)
    assert torch.all(dw[1] == 0) and torch.all(dw[4] == 0)


@pytest.mark.parametrize("K", [1, 3])
def test_combine_kernels(K):
    gen = _gen(K)
    T, D = 13, 100
    inv = torch.randperm(T * K, generator=gen)
    o = torch.randn(T * K, D, generator=gen)
    w = torch.rand(T, K, generator=gen)
    y = combine_triton(o, inv, w, T, K, torch.float32)
    assert_close(y, ref.combine_ref(o.double(), inv, w.double()), 1e-6)
    ysum = combine_triton(o, inv, None, T, K, torch.float32)
    assert_close(ysum, ref.combine_ref(o.double(), inv, torch.ones(T, K).double()), 1e-6)
    # Backward: against autograd through the reference.
    dy = torch.randn(T, D, generator=gen)
    od, wd = o.double().requires_grad_(), w.double().requires_grad_()
    g_o, g_w = torch.autograd.grad(ref.combine_ref(od, inv, wd), (od, wd), dy.double())
    do, dwt = combine_bwd_triton(dy, o, inv, w)
    assert_close(do, g_o, 1e-6)
    assert_close(dwt, g_w, 1e-6)


def test_grouped_mm_public_triton_autograd():
    gen = _gen(7)
    counts = [3, 0, 11, 1]
    offsets = _offsets(counts)
    x = torch.randn(15, 40, generator=gen, requires_grad=True)
    w = torch.randn(4, 40, 24, generator=gen, requires_grad=True)
    dy = torch.randn(15, 24, generator=gen)
    gx, gw = torch.autograd.grad(mk.grouped_mm(x, w, offsets, backend="triton"), (x, w), dy)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    gxr, gwr = torch.autograd.grad(ref.grouped_mm_ref(xr, wr, offsets), (xr, wr), dy.double())
    assert_close(gx, gxr, 1e-5)
    assert_close(gw, gwr, 1e-5)
    assert torch.all(gw[1] == 0)


# --------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("case", INTERP_CASES, ids=[c[0] for c in INTERP_CASES])
def test_moe_mlp_triton_backend(case):
    check_backend_case(mk.moe_mlp, case, "triton")


def test_moe_mlp_triton_deterministic():
    check_deterministic(mk.moe_mlp, INTERP_CASES[5], "triton")  # empty_experts


def test_moe_mlp_triton_matches_torch_backend():
    from _kernels_cases import make_problem

    params, ids, wts, _ = make_problem(17, 40, 24, 5, 2, "zipf", dtype=torch.float32)
    a = mk.moe_mlp(*params, ids, wts, backend="triton")
    b = mk.moe_mlp(*params, ids, wts, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
