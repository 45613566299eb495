"""Shared problem builders and comparisons for the moe_kernels tests (not a test file).

Shape legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token.
"""

from __future__ import annotations

import torch
from moe_kernels import reference as ref

# (name, T, D, F, E, K, routing). Awkward on purpose: D, F not powers of two, T=1, K=1..4,
# K=E, E=1, prime E, experts with no tokens, all tokens on one expert, Zipf-skewed routing,
# equal counts per expert (the CPU path's batched-matmul runs).
CASES = [
    ("T1", 1, 100, 72, 4, 2, "random"),
    ("D100_F600", 37, 100, 600, 8, 2, "random"),
    ("K1", 16, 40, 24, 5, 1, "random"),
    ("K2", 16, 40, 24, 5, 2, "random"),
    ("K3", 16, 40, 24, 5, 3, "random"),
    ("K4", 16, 40, 24, 5, 4, "random"),
    ("K_eq_E", 12, 40, 24, 4, 4, "random"),
    ("E1", 20, 100, 72, 1, 1, "random"),
    ("prime_E_zipf", 48, 72, 40, 13, 4, "zipf"),
    ("empty_experts", 24, 40, 100, 6, 2, "sparse"),
    ("one_expert", 30, 100, 40, 5, 1, "one"),
    ("one_expert_set", 30, 40, 24, 7, 3, "one"),
    ("balanced", 24, 40, 24, 6, 2, "balanced"),
]

# Small subset for the (slow) triton interpreter.
INTERP_CASES = [c for c in CASES if c[0] in
                ("T1", "K1", "K_eq_E", "E1", "prime_E_zipf", "empty_experts", "one_expert")]


def make_routing(T: int, E: int, K: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """expert_ids_TK (int64), K distinct experts per token."""
    if kind == "random":
        scores = torch.rand(T, E, generator=gen)
    elif kind == "zipf":
        p_E = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.5
        return torch.multinomial(p_E.expand(T, E), K, replacement=False, generator=gen)
    elif kind == "sparse":  # only experts 0, 2, 5 (mod E) ever get tokens
        allowed = sorted({0, 2 % E, 5 % E})
        assert len(allowed) >= K
        scores = torch.full((T, E), -1.0)
        scores[:, allowed] = torch.rand(T, len(allowed), generator=gen)
    elif kind == "balanced":  # token t gets experts (t*K + j) mod E: equal counts
        return (torch.arange(T).unsqueeze(1) * K + torch.arange(K)) % E
    elif kind == "one":  # every token picks experts E-1, E-2, ...: expert E-1 gets all
        return (E - 1 - torch.arange(K)).expand(T, K).contiguous()
    else:
        raise ValueError(kind)
    return torch.topk(scores, K, dim=1).indices


def make_problem(T, D, F, E, K, routing, seed=0, dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen, dtype=torch.float64)
    w1 = torch.randn(E, D, F, generator=gen, dtype=torch.float64) / D**0.5
    w3 = torch.randn(E, D, F, generator=gen, dtype=torch.float64) / D**0.5
    w2 = torch.randn(E, F, D, generator=gen, dtype=torch.float64) / F**0.5
    ids = make_routing(T, E, K, routing, gen)
    wts = torch.rand(T, K, generator=gen, dtype=torch.float64) + 0.1
    wts = wts / wts.sum(1, keepdim=True)
    dy = torch.randn(T, D, generator=gen, dtype=torch.float64)
    cast = [t.to(device=device, dtype=dtype) for t in (x, w1, w3, w2)]
    return cast, ids.to(device), wts.to(device=device, dtype=torch.float32 if dtype != torch.float64
                                        else dtype), dy.to(device=device, dtype=dtype)


def reference_out_grads(params, ids, wts, dy):
    """float64 per-token reference output and grads for (x, w1, w3, w2, weights)."""
    ps = [p.detach().cpu().double().requires_grad_() for p in params]
    w = wts.detach().cpu().double().requires_grad_()
    y = ref.moe_mlp_ref(*ps, ids.cpu(), w)
    grads = torch.autograd.grad(y, ps + [w], dy.cpu().double())
    return y.detach(), grads


def run_backend(moe_mlp, params, ids, wts, dy, backend):
    ps = [p.detach().clone().requires_grad_() for p in params]
    w = wts.detach().clone().requires_grad_()
    y = moe_mlp(*ps, ids, w, backend=backend)
    grads = torch.autograd.grad(y, ps + [w], dy)
    return y.detach(), grads


def assert_close(got, want, rtol, name=""):
    """max|got - want| <= rtol * max(|want|, 1e-3): tolerance relative to the tensor's scale
    (elementwise relative error is meaningless where a sum cancels to ~0)."""
    got = got.detach().cpu().double()
    want = want.detach().cpu().double()
    assert got.shape == want.shape, (name, got.shape, want.shape)
    scale = max(want.abs().max().item(), 1e-3)
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= rtol * scale, f"{name}: max abs err {err:.3g} > {rtol:g} * scale {scale:.3g}"


GRAD_NAMES = ("dx", "dw1", "dw3", "dw2", "dweights")


def check_backend_case(moe_mlp, case, backend, dtype=torch.float32, device="cpu", rtol=2e-5):
    name, T, D, F, E, K, routing = case
    params, ids, wts, dy = make_problem(T, D, F, E, K, routing, dtype=dtype, device=device)
    y_ref, g_ref = reference_out_grads(params, ids, wts, dy)
    y, grads = run_backend(moe_mlp, params, ids, wts, dy, backend)
    assert y.dtype == dtype
    assert_close(y, y_ref, rtol, f"{name}/{backend}/y")
    for gname, g, gr in zip(GRAD_NAMES, grads, g_ref):
        assert_close(g, gr, rtol, f"{name}/{backend}/{gname}")
    # Experts that got no tokens must get exactly zero weight gradients.
    used = torch.zeros(E, dtype=torch.bool)
    used[ids.reshape(-1).cpu()] = True
    for gname, g in zip(("dw1", "dw3", "dw2"), grads[1:4]):
        assert torch.all(g[~used.to(g.device)] == 0), f"{name}/{backend}/{gname} not 0"
    return y, grads


def check_deterministic(moe_mlp, case, backend, dtype=torch.float32, device="cpu"):
    _, T, D, F, E, K, routing = case
    params, ids, wts, dy = make_problem(T, D, F, E, K, routing, dtype=dtype, device=device)
    y1, g1 = run_backend(moe_mlp, params, ids, wts, dy, backend)
    y2, g2 = run_backend(moe_mlp, params, ids, wts, dy, backend)
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
