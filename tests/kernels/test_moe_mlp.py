"""CPU tests of the torch and loop backends of moe_kernels.moe_mlp and grouped_mm against
float64 per-token references (outputs and gradients for x, w1, w3, w2, weights)."""

from __future__ import annotations

import subprocess
import sys

import moe_kernels as mk
import pytest
import torch
import torch.nn.functional as nnf
from _kernels_cases import (
    CASES,
    assert_close,
    check_backend_case,
    check_deterministic,
    make_problem,
)
from moe_kernels import reference as ref


@pytest.mark.parametrize("backend", ["torch", "loop"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_backend_matches_float64_reference(case, backend):
    check_backend_case(mk.moe_mlp, case, backend)


@pytest.mark.parametrize("backend", ["torch", "loop"])
def test_float64_inputs_are_exact_to_reference(backend):
    # float64 in, float64 out: grouped_mm has no float64 kernel, so the torch backend falls
    # back to a per-expert mm; agreement is then to float64 rounding.
    check_backend_case(mk.moe_mlp, CASES[1], backend, dtype=torch.float64, rtol=1e-12)


def test_auto_is_torch_on_cpu():
    params, ids, wts, _ = make_problem(9, 40, 24, 4, 2, "random", dtype=torch.float32)
    a = mk.moe_mlp(*params, ids, wts, backend="auto")
    b = mk.moe_mlp(*params, ids, wts, backend="torch")
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "loop"])
def test_single_expert_is_dense_swiglu(backend):
    params, ids, wts, _ = make_problem(20, 100, 72, 1, 1, "random", dtype=torch.float32)
    x, w1, w3, w2 = params
    ones = torch.ones_like(wts)
    y = mk.moe_mlp(x, w1, w3, w2, ids, ones, backend=backend)
    dense = (nnf.silu(x @ w1[0]) * (x @ w3[0])) @ w2[0]
    torch.testing.assert_close(y, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "loop"])
@pytest.mark.parametrize("case", [CASES[1], CASES[8], CASES[9]], ids=lambda c: c[0])
def test_repeated_runs_bitwise_equal(case, backend):
    check_deterministic(mk.moe_mlp, case, backend)


def test_bf16_torch_backend_close():
    # bf16 on CPU: the torch backend runs (grouped_mm supports bf16 when strides are 16-byte
    # aligned; D=40 bf16 rows are 80 bytes, so this also exercises the aligned path).
    case = ("bf16", 32, 64, 48, 6, 2, "random")
    check_backend_case(mk.moe_mlp, case, "torch", dtype=torch.bfloat16, rtol=3e-2)


def test_unaligned_bf16_falls_back():
    # D=100 bf16: 200-byte rows, not 16-byte multiples -> per-expert mm fallback.
    case = ("bf16_unaligned", 8, 100, 72, 3, 2, "random")
    check_backend_case(mk.moe_mlp, case, "torch", dtype=torch.bfloat16, rtol=3e-2)


# --------------------------------------------------------------------------- grouped_mm


@pytest.mark.parametrize("backend", ["torch", "loop"])
def test_grouped_mm_forward_and_grads(backend):
    gen = torch.Generator().manual_seed(1)
    E, D, F = 5, 100, 72
    counts = [3, 0, 11, 1, 0]
    offsets = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32)
    N = sum(counts)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    w = torch.randn(E, D, F, generator=gen, dtype=torch.float64)
    dy = torch.randn(N, F, generator=gen, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    yr = ref.grouped_mm_ref(xr, wr, offsets)
    gxr, gwr = torch.autograd.grad(yr, (xr, wr), dy)
    xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
    y = mk.grouped_mm(xf, wf, offsets, backend=backend)
    gx, gw = torch.autograd.grad(y, (xf, wf), dy.float())
    assert_close(y, yr, 1e-5, "y")
    assert_close(gx, gxr, 1e-5, "dx")
    assert_close(gw, gwr, 1e-5, "dw")
    assert torch.all(gw[1] == 0) and torch.all(gw[4] == 0)


def test_grouped_dw_reference_matches_autograd():
    gen = torch.Generator().manual_seed(2)
    offsets = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    x = torch.randn(9, 7, generator=gen, dtype=torch.float64)
    dy = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    w = torch.zeros(3, 7, 5, dtype=torch.float64, requires_grad=True)
    (gw,) = torch.autograd.grad(ref.grouped_mm_ref(x, w, offsets), (w,), dy)
    torch.testing.assert_close(ref.grouped_dw_ref(x, dy, offsets), gw)


# --------------------------------------------------------------------------- validation


def _good():
    params, ids, wts, _ = make_problem(6, 40, 24, 4, 2, "random", dtype=torch.float32)
    return params, ids, wts


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.__setitem__(0, a[0][0]), "x_TD must be a 2-D"),
        (lambda a: a.__setitem__(0, a[0][:, :30]), "D mismatch"),
        (lambda a: a.__setitem__(2, a[2][:, :, :10]), "w3_EDF must have shape"),
        (lambda a: a.__setitem__(3, a[3][:, :10]), "w2_EFD must have shape"),
        (lambda a: a.__setitem__(4, a[4] + 4), "expert id out of range"),
        (lambda a: a.__setitem__(4, a[4] - 5), "expert id out of range"),
        (lambda a: a.__setitem__(4, a[4].float()), "expert_ids_TK must be int"),
        (lambda a: a.__setitem__(5, a[5][:3]), "must both be"),
        (lambda a: a.__setitem__(1, a[1].double()), "w1_EDF is torch.float64"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "loop"])
def test_moe_mlp_rejects_bad_inputs(mutate, match, backend):
    params, ids, wts = _good()
    args = [*params, ids, wts]
    mutate(args)
    with pytest.raises(ValueError, match=match):
        mk.moe_mlp(*args, backend=backend)


def test_unknown_backend_rejected():
    params, ids, wts = _good()
    with pytest.raises(ValueError, match="backend must be one of"):
        mk.moe_mlp(*params, ids, wts, backend="cuda")


def test_triton_backend_on_cpu_raises_clear_error():
    if mk.INTERPRET:
        pytest.skip("under TRITON_INTERPRET=1 the triton backend runs on CPU")
    params, ids, wts = _good()
    # ValueError naming the device problem where triton is installed; RuntimeError naming
    # the missing package where it is not (see test_import_without_triton).
    err = ValueError if mk.HAS_TRITON else RuntimeError
    with pytest.raises(err, match="needs CUDA tensors" if mk.HAS_TRITON else "triton package"):
        mk.moe_mlp(*params, ids, wts, backend="triton")
    with pytest.raises(err):
        mk.topk_route(torch.randn(4, 3), 2, backend="triton")
    with pytest.raises(err):
        mk.plan(ids, 4, backend="triton")
    with pytest.raises(err):
        mk.grouped_mm(torch.randn(2, 8), torch.randn(1, 8, 4),
                      torch.tensor([0, 2], dtype=torch.int32), backend="triton")


def test_grouped_mm_rejects_bad_offsets():
    x = torch.randn(10, 8)
    w = torch.randn(3, 8, 4)
    with pytest.raises(ValueError, match="length E\\+1"):
        mk.grouped_mm(x, w, torch.tensor([0, 5, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        mk.grouped_mm(x, w, torch.tensor([0, 5, 5, 10]))
    with pytest.raises(ValueError, match="non-decreasing"):
        mk.grouped_mm(x, w, torch.tensor([0, 6, 5, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        mk.grouped_mm(x, w, torch.tensor([0, 5, 5, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="D mismatch"):
        mk.grouped_mm(x, torch.randn(3, 7, 4), torch.tensor([0, 5, 5, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="x_ND must be 2-D"):
        mk.grouped_mm(x[0], w, torch.tensor([0, 5, 5, 10], dtype=torch.int32))


def test_import_without_triton():
    # Simulate a platform without triton: the package imports, torch works, triton errors.
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch, moe_kernels as mk\n"
        "assert not mk.HAS_TRITON\n"
        "x = torch.randn(4, 8); w = torch.randn(2, 8, 6); w2 = torch.randn(2, 6, 8)\n"
        "wts, ids = mk.topk_route(torch.randn(4, 2), 1)\n"
        "y = mk.moe_mlp(x, w, w, w2, ids, wts)\n"
        "try:\n"
        "    mk.moe_mlp(x, w, w, w2, ids, wts, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton package' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_constant_weights_skip_their_gradient_and_keep_the_others():
    """Hard (domain) routing passes weights that need no gradient; x and w grads are unchanged."""
    g = torch.Generator().manual_seed(3)
    T, D, F, E = 20, 24, 40, 3
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    ws = [torch.randn(E, D, F, generator=g, dtype=torch.float64) * 0.2,
          torch.randn(E, D, F, generator=g, dtype=torch.float64) * 0.2,
          torch.randn(E, F, D, generator=g, dtype=torch.float64) * 0.2]
    ids = torch.randint(0, E, (T, 1), generator=g)
    grads = []
    for need in (True, False):
        xs = x.clone().requires_grad_()
        wts = [w.clone().requires_grad_() for w in ws]
        weights = torch.ones(T, 1, dtype=torch.float64, requires_grad=need)
        y = mk.moe_mlp(xs, *wts, ids, weights, backend="torch")
        y.pow(2).sum().backward()
        assert (weights.grad is not None) == need
        grads.append([xs.grad] + [w.grad for w in wts])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
