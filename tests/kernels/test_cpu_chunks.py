"""The CPU torch backend works chunk by chunk of expert-sorted rows (moe_mlp._MoeMLPChunkedCPU).

Chunk size changes only the order of float operations, so every setting must match the float64
per-token reference: one row per chunk (every expert split across chunks, so dW pieces are
accumulated), odd sizes, the default, and chunking off (the whole-tensor path CUDA takes).
"""

from __future__ import annotations

import importlib

import moe_kernels as mk
import pytest
import torch
from _kernels_cases import CASES, check_backend_case, check_deterministic, make_problem
from hypothesis import given, settings
from hypothesis import strategies as st

mm_mod = importlib.import_module("moe_kernels.moe_mlp")

# rows per chunk; None = chunking off; "default" = the shipped CPU_CHUNK_BYTES
CHUNK_ROWS = [1, 3, 7, "default", None]


def _set_chunk_rows(monkeypatch, rows, D, F, itemsize):
    if rows == "default":
        return
    monkeypatch.setattr(mm_mod, "CPU_CHUNK_BYTES",
                        None if rows is None else rows * max(D, F) * itemsize)


@pytest.mark.parametrize("rows", CHUNK_ROWS, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_chunked_matches_float64_reference(monkeypatch, case, rows):
    _, T, D, F, E, K, _ = case
    _set_chunk_rows(monkeypatch, rows, D, F, 4)
    check_backend_case(mk.moe_mlp, case, "torch")


@pytest.mark.parametrize("rows", [1, 5, None], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_chunked_other_dtypes(monkeypatch, rows, dtype):
    case = ("dt", 24, 64, 48, 6, 2, "random")
    _set_chunk_rows(monkeypatch, rows, 64, 48, torch.tensor([], dtype=dtype).element_size())
    rtol = 3e-2 if dtype == torch.bfloat16 else 1e-12
    check_backend_case(mk.moe_mlp, case, "torch", dtype=dtype, rtol=rtol)


@pytest.mark.parametrize("rows", [1, 7, "default"], ids=str)
def test_chunked_runs_are_bitwise_repeatable(monkeypatch, rows):
    case = [c for c in CASES if c[0] == "prime_E_zipf"][0]
    _set_chunk_rows(monkeypatch, rows, case[2], case[3], 4)
    check_deterministic(mk.moe_mlp, case, "torch")


def test_no_grad_forward_equals_training_forward():
    """Under no_grad nothing is saved (chunk temporaries only); the output must not change."""
    params, ids, wts, _ = make_problem(30, 40, 24, 5, 2, "random", dtype=torch.float32)
    with torch.no_grad():
        a = mk.moe_mlp(*params, ids, wts, backend="torch")
    ps = [p.clone().requires_grad_() for p in params]
    b = mk.moe_mlp(*ps, ids, wts, backend="torch")
    assert b.requires_grad and torch.equal(a, b.detach())


def test_workspace_is_reused_and_clearable():
    params, ids, wts, _ = make_problem(16, 40, 24, 4, 2, "random", dtype=torch.float32)
    mm_mod.clear_cpu_workspace()
    with torch.no_grad():
        mk.moe_mlp(*params, ids, wts, backend="torch")
        ptrs = {k: v.data_ptr() for k, v in mm_mod._WS.bufs.items()}
        mk.moe_mlp(*params, ids, wts, backend="torch")
    assert ptrs and ptrs == {k: v.data_ptr() for k, v in mm_mod._WS.bufs.items()}
    mk.clear_cpu_workspace()
    assert not mm_mod._WS.bufs


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(0, 9), min_size=1, max_size=12), max_rows=st.integers(1, 20))
def test_row_chunks_cover_every_row_once(counts, max_rows):
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    chunks = mm_mod._row_chunks(bounds, max_rows)
    seen = []
    prev_hi = 0
    for lo, hi, runs in chunks:
        assert lo == prev_hi and 0 < hi - lo <= max_rows
        prev_hi = hi
        pos = 0
        for e0, n, s, L in runs:
            assert s == pos and L > 0 and n >= 1
            for i in range(n):
                a = lo + s + i * L
                # the rows belong to expert e0 + i
                assert bounds[e0 + i] <= a and a + L <= bounds[e0 + i + 1]
                seen.extend(range(a, a + L))
            pos += n * L
        assert pos == hi - lo
    assert prev_hi == bounds[-1]
    assert seen == list(range(bounds[-1]))


def test_equal_counts_make_batched_runs():
    # 4 experts of 5 rows, chunks of 10 rows: two runs of 2 experts each (one bmm apiece)
    runs = [r for _, _, r in mm_mod._row_chunks([0, 5, 10, 15, 20], 10)]
    assert runs == [[(0, 2, 0, 5)], [(2, 2, 0, 5)]]
    # an empty expert breaks a run (its neighbours' weights are not consecutive)
    assert mm_mod._row_chunks([0, 5, 5, 10], 10)[0][2] == [(0, 1, 0, 5), (2, 1, 5, 5)]


@pytest.mark.parametrize("first", ["inference_mode", "no_grad"])
def test_workspace_made_under_inference_mode_still_serves_training(first):
    """Lightning validates under torch.inference_mode; buffers first made (or grown) there
    must stay writable by the training steps that follow."""
    params, ids, wts, dy = make_problem(24, 40, 24, 4, 2, "random", dtype=torch.float32)
    mk.clear_cpu_workspace()
    ctx = torch.inference_mode() if first == "inference_mode" else torch.no_grad()
    with ctx:
        y0 = mk.moe_mlp(*params, ids, wts, backend="torch")
    ps = [p.clone().requires_grad_() for p in params]
    y = mk.moe_mlp(*ps, ids, wts, backend="torch")
    y.backward(dy)
    assert torch.equal(y.detach(), y0) and all(p.grad is not None for p in ps)


@settings(max_examples=150, deadline=None)
@given(counts=st.lists(st.integers(0, 6), min_size=1, max_size=8), max_rows=st.integers(1, 9))
def test_chunked_gemms_equal_per_expert_gemms(counts, max_rows):
    """_rows_mm and _dw_mm over any chunking (experts split across chunks, batched runs that
    start with a split expert) give each expert's rows @ w[e] and sum of a^T g over its rows."""
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    E, N, D, F = len(counts), bounds[-1], 3, 2
    gen = torch.Generator().manual_seed(N * 31 + max_rows)
    a = torch.randn(N, D, generator=gen, dtype=torch.float64)
    g = torch.randn(N, F, generator=gen, dtype=torch.float64)
    w = torch.randn(E, D, F, generator=gen, dtype=torch.float64)
    out = torch.full((N, F), float("nan"), dtype=torch.float64)
    dw = torch.full((E, D, F), float("nan"), dtype=torch.float64)
    started = [False] * E
    for lo, hi, runs in mm_mod._row_chunks(bounds, max_rows):
        mm_mod._rows_mm(a[lo:hi], mm_mod._per_expert(w), out[lo:hi], runs)
        mm_mod._rows_mm(a[lo:hi], mm_mod._per_expert(w), out[lo:hi], runs, accumulate=True)
        mm_mod._dw_mm(a[lo:hi], g[lo:hi], mm_mod._per_expert(dw), runs, started)
        for e0, n, _, _ in runs:
            started[e0:e0 + n] = [True] * n
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        assert started[e] == (hi > lo)
        torch.testing.assert_close(out[lo:hi], 2 * a[lo:hi] @ w[e])
        if hi > lo:
            torch.testing.assert_close(dw[e], a[lo:hi].t() @ g[lo:hi])


@pytest.mark.parametrize("needs", [(0,), (1,), (2,), (3,), (4,), (1, 2, 3), (0, 4), (3, 4)],
                         ids=str)
def test_only_needed_gradients_are_computed_and_equal_the_full_ones(monkeypatch, needs):
    """Frozen experts (router-only training) or a leaf x: the CPU path skips those GEMMs;
    what it returns is bitwise what the all-gradients run gives."""
    case = [c for c in CASES if c[0] == "prime_E_zipf"][0]
    _, T, D, F, E, K, routing = case
    _set_chunk_rows(monkeypatch, 7, D, F, 4)
    params, ids, wts, dy = make_problem(T, D, F, E, K, routing, dtype=torch.float32)
    full = [t.clone().requires_grad_() for t in (*params, wts)]
    mk.moe_mlp(*full[:4], ids, full[4], backend="torch").backward(dy)
    part = [t.clone().requires_grad_(i in needs) for i, t in enumerate((*params, wts))]
    mk.moe_mlp(*part[:4], ids, part[4], backend="torch").backward(dy)
    for i, (f, p) in enumerate(zip(full, part)):
        if i in needs:
            assert torch.equal(p.grad, f.grad), i
        else:
            assert p.grad is None
