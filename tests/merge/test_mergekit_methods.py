"""mergekit's other merge methods (model_stock, breadcrumbs[_ties], della[_linear], sce, nuslerp,
multislerp, karcher, nearswap): each against a hand computation of its formula on tiny tensors
(plain Python loops and closed forms, written apart from moe/merge/), edge cases, parameters
through `moe merge`, and bad parameters refused at load time.

`pytest -s` prints the largest absolute difference measured against each hand computation.
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
import yaml

from moe.cli import main
from moe.config import ConfigError, ModelConfig
from moe.io.checkpoint import load_checkpoint, make_meta, save_checkpoint
from moe.merge import merge_config_from_dict, registry
from moe.merge.registry import MethodParams, tensor_generator
from moe.merge.slerp import slerp_tensors
from moe.model.transformer import Transformer

DIFFS: dict[str, float] = defaultdict(float)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print("\nmax |method - hand computation| per method:")
    for k in sorted(DIFFS):
        print(f"  {k:18s} {DIFFS[k]:.3e}")


def close(method: str, got: torch.Tensor, want, atol: float = 1e-12) -> None:
    want = torch.as_tensor(want, dtype=torch.float64).reshape(got.shape)
    d = float((got.double() - want).abs().max())
    DIFFS[method] = max(DIFFS[method], d)
    assert d <= atol, f"{method}: max abs difference {d:.3e} > {atol}"


def P(n=2, weights=None, densities=None, normalize=False, scale=1.0, t=0.5, seed=0, name="w",
      **extra):  # fmt: skip
    return MethodParams(weights=weights or [1.0] * n, densities=densities or [1.0] * n,
                        normalize=normalize, scale=scale, t=t, seed=seed, name=name,
                        extra=extra)  # fmt: skip


def fn(name):
    return registry.get(name).fn


def T(*v):
    return torch.tensor(v, dtype=torch.float64)


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def norm(a):
    return math.sqrt(dot(a, a))


# ----------------------------------------------------------------------------- model_stock


def test_model_stock_two_models_closed_form():
    base = [1.0, -1.0, 0.5]
    d1, d2 = [1.0, 2.0, 0.0], [2.0, 1.0, 0.0]  # cos = 4 / 5
    th = [[b + d for b, d in zip(base, dd)] for dd in (d1, d2)]
    t = 2 * 0.8 / (1 + 0.8)  # 8/9
    want = [t * (x + y) / 2 + (1 - t) * b for x, y, b in zip(*th, base)]
    got = fn("model_stock")(T(*base), [T(*th[0]), T(*th[1])], P())
    close("model_stock", got, want)


def test_model_stock_three_models_mean_pairwise_cosine_and_filter_wise():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, generator=g, dtype=torch.float64)
    ths = [base + torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    B, TH = base.tolist(), [x.tolist() for x in ths]

    def t_of(vs):  # vs: the three task vectors as flat lists
        cs = [dot(vs[i], vs[j]) / (norm(vs[i]) * norm(vs[j]))
              for i in range(3) for j in range(i + 1, 3)]  # fmt: skip
        c = sum(cs) / 3
        return 3 * c / (1 + 2 * c)

    flat = [[x - b for r, rb in zip(th, B) for x, b in zip(r, rb)] for th in TH]
    t = t_of(flat)
    want = [[t * sum(th[i][j] for th in TH) / 3 + (1 - t) * B[i][j] for j in range(4)]
            for i in range(3)]  # fmt: skip
    close("model_stock", fn("model_stock")(base, ths, P(3)), want)
    # filter_wise: one t per row
    want = []
    for i in range(3):
        ti = t_of([[th[i][j] - B[i][j] for j in range(4)] for th in TH])
        want.append([ti * sum(th[i][j] for th in TH) / 3 + (1 - ti) * B[i][j] for j in range(4)])
    close("model_stock", fn("model_stock")(base, ths, P(3, filter_wise=True)), want)


def test_model_stock_identity_cases():
    base, a = T(1.0, 2.0, 3.0), T(1.5, 1.0, 0.0)
    # every model equal: cos = 1, t = 1 -> that model; every model the base: cos = 0 -> base
    close("model_stock", fn("model_stock")(base, [a, a.clone()], P()), a.tolist())
    close("model_stock", fn("model_stock")(base, [base.clone(), base.clone()], P()), base.tolist())
    # a 1-D tensor with filter_wise is one row: the same as the whole tensor
    b = T(0.0, 2.5, 3.0)
    torch.testing.assert_close(fn("model_stock")(base, [a, b], P(filter_wise=True)),
                               fn("model_stock")(base, [a, b], P()), rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------- breadcrumbs


def crumbs_ref(delta: list[float], density: float, gamma: float) -> list[float]:
    """Keep the ⌊density·n⌋ magnitudes just below the ⌊gamma·n⌋ largest (ranked by hand)."""
    n = len(delta)
    keep, top = int(density * n), int(gamma * n)
    top = min(top, n - keep)
    bottom = n - keep - top
    ranked = sorted(range(n), key=lambda i: (abs(delta[i]), i))  # ascending, earlier first
    kept = set(ranked[bottom:bottom + keep])
    return [d if i in kept else 0.0 for i, d in enumerate(delta)]


def test_breadcrumbs_by_hand():
    base = [0.0] * 10
    d1 = [0.5, -0.1, 0.9, 0.3, -0.7, 0.2, 1.0, -0.4, 0.6, 0.8]
    d2 = [-0.3, 0.6, 0.1, -0.9, 0.5, 0.7, -0.2, 0.4, 1.0, -0.8]
    # density 0.5, gamma 0.2: drop the 2 largest and the 3 smallest magnitudes
    assert crumbs_ref(d1, 0.5, 0.2) == [0.5, 0.0, 0.0, 0.0, -0.7, 0.0, 0.0, -0.4, 0.6, 0.8]
    s1, s2 = crumbs_ref(d1, 0.5, 0.2), crumbs_ref(d2, 0.6, 0.1)
    w = [1.0, 0.5]
    want = [2.0 * (w[0] * a + w[1] * b) for a, b in zip(s1, s2)]  # λ = 2
    p = P(weights=w, densities=[0.5, 0.6], scale=2.0, gamma=[0.2, 0.1])
    close("breadcrumbs", fn("breadcrumbs")(T(*base), [T(*d1), T(*d2)], p), want)
    p = P(weights=w, densities=[0.5, 0.6], scale=2.0, gamma=[0.2, 0.1], normalize=True)
    close("breadcrumbs", fn("breadcrumbs")(T(*base), [T(*d1), T(*d2)], p),
          [x / 1.5 for x in want])  # fmt: skip
    # breadcrumbs_ties: sign election over the sparsified vectors, disjoint mean
    want = []
    for a, b in zip(s1, s2):
        s = w[0] * a + w[1] * b
        agree = [(wi, x) for wi, x in zip(w, (a, b)) if x != 0 and (x > 0) == (s > 0) and s != 0]
        num = sum(wi * x for wi, x in agree)
        den = sum(wi for wi, _ in agree)
        want.append(num / den if den else 0.0)
    p = P(weights=w, densities=[0.5, 0.6], gamma=[0.2, 0.1], normalize=True)
    close("breadcrumbs_ties", fn("breadcrumbs_ties")(T(*base), [T(*d1), T(*d2)], p), want)


def test_breadcrumbs_outlier_counts_and_density_one():
    d = [0.1 * (i + 1) * (-1) ** i for i in range(10)]
    base = T(*[0.0] * 10)
    one = fn("breadcrumbs")
    # ⌊gamma·n⌋ = 0 outliers: exactly ⌊density·n⌋ largest kept (mergekit keeps none there)
    close("breadcrumbs", one(base, [T(*d)], P(1, densities=[0.3], gamma=[0.05])),
          crumbs_ref(d, 0.3, 0.05))  # fmt: skip
    assert int((one(base, [T(*d)], P(1, densities=[0.3], gamma=[0.05])) != 0).sum()) == 3
    # gamma too large for the density: only n - k outliers dropped, k kept
    got = one(base, [T(*d)], P(1, densities=[0.8], gamma=[0.5]))
    close("breadcrumbs", got, crumbs_ref(d, 0.8, 0.5))
    assert int((got != 0).sum()) == 8 and float(got.abs().max()) == pytest.approx(0.8)
    # density 1: the task vector unchanged (gamma unused), i.e. task arithmetic
    close("breadcrumbs", one(base, [T(*d)], P(1, gamma=[0.5])), d)


# ----------------------------------------------------------------------------- della


def della_ref(delta: torch.Tensor, density: float, eps: float, u: torch.Tensor, rescale=True):
    """DELLA by hand: rank each row by |δ| (loops), p = ρ - ε + 2ε r/(C-1), keep where u < p."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    ur = u.reshape(rows.shape)
    out = []
    for r, row in enumerate(rows.tolist()):
        c = len(row)
        order = sorted(range(c), key=lambda j: (abs(row[j]), j))
        rank = {j: k for k, j in enumerate(order)}
        new = []
        for j, x in enumerate(row):
            p = density - eps + 2 * eps * (rank[j] / (c - 1) if c > 1 else 0.0)
            keep = float(ur[r, j]) < p
            new.append((x / p if rescale else x) if keep else 0.0)
        out.append(new)
    return torch.tensor(out, dtype=torch.float64).reshape(delta.shape)


def test_della_linear_and_della_by_hand():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 6, generator=g, dtype=torch.float64)
    ths = [base + torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    rho, eps, w, lam, seed, name = [0.5, 0.6], [0.2, 0.1], [1.0, 0.7], 0.9, 3, "layers.0.w"
    # the draws of model i: the method's generator (seed, tensor name, i), uniforms in float64
    us = [torch.rand((4, 6), generator=tensor_generator(seed, name, i), dtype=torch.float64)
          for i in range(2)]  # fmt: skip
    sp = [della_ref(th - base, r, e, u) for th, r, e, u in zip(ths, rho, eps, us)]
    p = P(weights=w, densities=rho, scale=lam, seed=seed, name=name, epsilon=eps)
    want = base + lam * (w[0] * sp[0] + w[1] * sp[1])
    close("della_linear", fn("della_linear")(base, ths, p), want)
    pn = P(weights=w, densities=rho, scale=lam, seed=seed, name=name, epsilon=eps, normalize=True)
    close("della_linear", fn("della_linear")(base, ths, pn),
          base + lam * (w[0] * sp[0] + w[1] * sp[1]) / sum(w))  # fmt: skip
    # della: TIES' election and disjoint mean over the pruned vectors, entry by entry
    want = base.clone()
    for i in range(4):
        for j in range(6):
            xs = [float(s[i, j]) for s in sp]
            s = sum(wi * x for wi, x in zip(w, xs))
            ag = [(wi, x) for wi, x in zip(w, xs) if x != 0 and s != 0 and (x > 0) == (s > 0)]
            den = sum(wi for wi, _ in ag)
            want[i, j] += lam * (sum(wi * x for wi, x in ag) / den if den else 0.0)
    close("della", fn("della")(base, ths, pn), want)
    # rescale: false keeps the entries as they are
    sp0 = della_ref(ths[0] - base, 0.5, 0.2, us[0], rescale=False)
    p1 = P(1, densities=[0.5], seed=seed, name=name, epsilon=[0.2], rescale=False)
    close("della_linear", fn("della_linear")(base, ths[:1], p1), base + sp0)


def test_della_one_dim_unbiased_and_deterministic():
    delta = T(0.3, -1.2, 0.05, 0.8, -0.4, 2.0, 0.0, -0.01)
    base = torch.zeros(8, dtype=torch.float64)
    u = torch.rand((8,), generator=tensor_generator(0, "b", 0), dtype=torch.float64)
    got = fn("della_linear")(base, [delta], P(1, densities=[0.4], name="b", epsilon=[0.3]))
    close("della_linear", got, della_ref(delta, 0.4, 0.3, u))  # a 1-D tensor is one row
    again = fn("della_linear")(base, [delta], P(1, densities=[0.4], name="b", epsilon=[0.3]))
    assert torch.equal(got, again)
    # E[δ̃] = δ: the mean over 4000 seeds is within a few standard errors of δ
    mean = sum(fn("della_linear")(base, [delta], P(1, densities=[0.4], seed=s, name="b",
                                                   epsilon=[0.3])) for s in range(4000)) / 4000
    assert float((mean - delta).abs().max()) < 0.12


def test_della_epsilon_zero_is_dare_in_float32():
    """ε = 0: every p_keep is the density, and the draws are DARE's: the same merge."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(5, 7, generator=g)
    ths = [base + torch.randn(5, 7, generator=g) for _ in range(3)]
    p = P(3, weights=[1.0, 0.5, 2.0], densities=[0.3, 0.5, 0.9], name="x", seed=4,
          epsilon=[0.0, 0.0, 0.0])  # fmt: skip
    torch.testing.assert_close(fn("della_linear")(base, ths, p), fn("dare_linear")(base, ths, p),
                               rtol=0, atol=0)  # fmt: skip
    pn = dict(p.__dict__, normalize=True)
    pn = MethodParams(**pn)
    torch.testing.assert_close(fn("della")(base, ths, pn), fn("dare_ties")(base, ths, pn),
                               rtol=0, atol=0)  # fmt: skip


# ----------------------------------------------------------------------------- sce


def test_sce_by_hand():
    base = [0.0, 1.0, 2.0, 3.0, 4.0]
    d = [[0.5, -0.2, 0.0, 0.3, 0.1], [0.3, 0.4, -0.1, 0.3, -0.6], [-0.2, 0.1, 0.2, 0.3, 0.2]]
    for topk in (1.0, 0.6):
        dd = [row[:] for row in d]
        if topk < 1:
            var = []
            for j in range(5):
                col = [row[j] for row in dd]
                m = sum(col) / 3
                var.append(sum((x - m) ** 2 for x in col) / 3)
            k = int(sum(1 for v in var if v != 0) * topk)  # 4 nonzero (pos 3 is constant) -> 2
            top = sorted(range(5), key=lambda j: (-var[j], j))[:k]
            dd = [[x if j in top else 0.0 for j, x in enumerate(row)] for row in dd]
        energy = [sum(x * x for x in row) / 5 for row in dd]
        w = [e / sum(energy) for e in energy]
        want = []
        for j in range(5):
            s = sum(row[j] for row in dd)
            g = 1.0 if s >= 0 else -1.0
            agree = [(wi, row[j]) for wi, row in zip(w, dd) if (row[j] > 0) - (row[j] < 0) == g]
            num = sum(wi * x for wi, x in agree)
            den = max(sum(wi for wi, _ in agree), 1e-6)
            want.append(base[j] + num / den)
        ths = [T(*[b + x for b, x in zip(base, row)]) for row in d]
        close("sce", fn("sce")(T(*base), ths, P(3, select_topk=topk)), want)


def test_sce_identical_models_and_tiny_task_vectors():
    base, a = T(1.0, 2.0, 3.0), T(1.5, 1.0, 3.5)
    close("sce", fn("sce")(base, [a, a.clone()], P()), a.tolist())
    # with select_topk < 1 identical models have no position of nonzero variance: k = 0, every
    # task vector is erased and the base comes out (mergekit's rule)
    close("sce", fn("sce")(base, [a, a.clone()], P(select_topk=0.5)), base.tolist())
    # mean(δ²) summing below 1e-6: equal weights 1/M (mergekit's rule), still the agreeing mean
    b2 = base + T(1e-4, -2e-4, 0.0)
    b3 = base + T(3e-4, 1e-4, 0.0)
    # pos 0: the plain mean of both (energy weights 1/3, 2/3 would give 2.33e-4); pos 1: the sum
    # is < 0, only b2 agrees; pos 2: no model agrees, 0
    want = [1.0 + 2e-4, 2.0 - 2e-4, 3.0]
    close("sce", fn("sce")(base, [b2, b3], P()), want, atol=1e-12)


# ----------------------------------------------------------------------------- nuslerp


def slerp_ref(t, a, b):
    """Plain slerp of two lists (the textbook formula; no fallback needed for these inputs)."""
    om = math.acos(dot(a, b) / (norm(a) * norm(b)))
    return [(math.sin((1 - t) * om) * x + math.sin(t * om) * y) / math.sin(om)
            for x, y in zip(a, b)]  # fmt: skip


def test_nuslerp_flatten_rows_columns_and_base():
    a = [[1.0, 0.0, 2.0], [0.5, -1.0, 1.0]]
    b = [[0.0, 1.0, 1.0], [2.0, 0.5, -1.0]]
    A, B = T(*a), T(*b)
    w = [1.0, 3.0]  # t = 3/4
    flat = slerp_ref(0.75, a[0] + a[1], b[0] + b[1])
    close("nuslerp", fn("nuslerp")(None, [A, B], P(weights=w)), flat)
    rows = [slerp_ref(0.75, a[i], b[i]) for i in range(2)]
    close("nuslerp", fn("nuslerp")(None, [A, B], P(weights=w, nuslerp_flatten=False)), rows)
    cols = [slerp_ref(0.75, [a[0][j], a[1][j]], [b[0][j], b[1][j]]) for j in range(3)]
    got = fn("nuslerp")(None, [A, B], P(weights=w, nuslerp_flatten=False, nuslerp_row_wise=True))
    close("nuslerp", got, [[cols[j][i] for j in range(3)] for i in range(2)])
    # with a base: the task vectors are slerped and the base added back
    base = T(*[[0.1, 0.2, 0.3], [-0.1, 0.0, 0.4]])
    bl = base.reshape(-1).tolist()
    da = [x - y for x, y in zip(a[0] + a[1], bl)]
    db = [x - y for x, y in zip(b[0] + b[1], bl)]
    want = [y + z for y, z in zip(bl, slerp_ref(0.75, da, db))]
    close("nuslerp", fn("nuslerp")(base, [A, B], P(weights=w)), want)


def test_nuslerp_is_slerp_and_handles_parallel_and_zero_weights():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g,
                                                                            dtype=torch.float64)
    for t in (0.0, 0.3, 0.5, 1.0):
        close("nuslerp", fn("nuslerp")(None, [a, b], P(weights=[1 - t, t])),
              slerp_tensors(t, a, b))  # fmt: skip
    # parallel vectors: linear interpolation; weights summing to 0: t = 1/2 (mergekit's rule)
    close("nuslerp", fn("nuslerp")(None, [a, 2 * a], P(weights=[1.0, 1.0])), 1.5 * a)
    close("nuslerp", fn("nuslerp")(None, [a, b], P(weights=[1.0, -1.0])), slerp_tensors(0.5, a, b))


# ----------------------------------------------------------------------------- multislerp


def multislerp_ref(vs, w, eps=1e-8):
    """mergekit's multislerp formula, step by step on lists."""
    norms = [norm(v) for v in vs]
    units = [[x / (n + eps) for x in v] for v, n in zip(vs, norms)]
    m = [sum(wi * u[j] for wi, u in zip(w, units)) for j in range(len(vs[0]))]
    mn = norm(m)
    m = [x / mn for x in m]
    tang = [0.0] * len(m)
    for wi, u in zip(w, units):
        c = dot(u, m)
        tang = [tj + wi * (uj - c * mj) for tj, uj, mj in zip(tang, u, m)]
    tn = norm(tang) + eps
    scale = sum(wi * n for wi, n in zip(w, norms))
    return [scale * (math.cos(tn) * mj + math.sin(tn) / tn * tj) for mj, tj in zip(m, tang)]


def test_multislerp_by_hand_and_with_base():
    vs = [[1.0, 0.2, -0.5, 2.0], [0.3, 1.5, 0.5, -1.0], [-0.4, 0.8, 1.2, 0.6]]
    w = [1.0, 2.0, 1.0]
    got = fn("multislerp")(None, [T(*v) for v in vs], P(3, weights=w))
    close("multislerp", got, multislerp_ref(vs, [x / 4 for x in w]))
    got = fn("multislerp")(None, [T(*v) for v in vs], P(3, weights=w, normalize_weights=False))
    close("multislerp", got, multislerp_ref(vs, w), atol=1e-11)
    base = [0.1, -0.1, 0.2, 0.0]
    ths = [T(*[x + b for x, b in zip(v, base)]) for v in vs]
    got = fn("multislerp")(T(*base), ths, P(3, weights=w))
    close("multislerp", got, [b + x for b, x in zip(base, multislerp_ref(vs, [x / 4 for x in w]))])


def test_multislerp_two_equal_norms_is_slerp_and_identity():
    a = T(3.0, 0.0, 4.0)
    b = T(0.0, 5.0, 0.0)  # same norm
    close("multislerp", fn("multislerp")(None, [a, b], P()), slerp_tensors(0.5, a, b), atol=1e-7)
    close("multislerp", fn("multislerp")(None, [a, a.clone(), a.clone()], P(3)), a, atol=1e-7)
    # opposite models with equal weights: two of them interpolate linearly
    close("multislerp", fn("multislerp")(None, [a, -a], P()), torch.zeros(3))
    with pytest.raises(ConfigError, match="weighted mean"):
        fn("multislerp")(None, [a, -a, a, -a], P(4))


# ----------------------------------------------------------------------------- karcher


def test_karcher_on_a_circle_is_the_mean_angle():
    """In the plane, the Karcher mean of directions within a half circle is their mean angle;
    the norm is the mean norm."""
    angles, norms = [0.1, 0.5, 1.2], [1.0, 2.0, 3.0]
    ts = [T(n * math.cos(a), n * math.sin(a)) for a, n in zip(angles, norms)]
    mean = sum(angles) / 3
    want = [2.0 * math.cos(mean), 2.0 * math.sin(mean)]
    close("karcher", fn("karcher")(None, ts, P(3)), want, atol=1e-9)


def test_karcher_two_models_is_slerp_and_optimality():
    a, b = T(3.0, 0.0, 4.0, 0.0), T(0.0, 5.0, 0.0, 0.0)
    close("karcher", fn("karcher")(None, [a, b], P()), slerp_tensors(0.5, a, b), atol=1e-9)
    close("karcher", fn("karcher")(None, [a, a.clone()], P()), a)
    # N directions in R^5: at the mean u, Σ θ_i/sin θ_i (u_i - cos θ_i u) = 0 (first order)
    g = torch.Generator().manual_seed(5)
    ts = [torch.randn(5, generator=g, dtype=torch.float64) + 2.0 for _ in range(4)]
    got = fn("karcher")(None, ts, P(4, max_iter=100, tol=1e-12))
    u = (got / got.norm()).tolist()
    grad = [0.0] * 5
    for v in ts:
        ui = (v / v.norm()).tolist()
        c = dot(u, ui)
        th = math.acos(c)
        grad = [gj + th / math.sin(th) * (x - c * y) for gj, x, y in zip(grad, ui, u)]
    assert norm(grad) < 1e-10
    close("karcher", got.norm().reshape(1), [sum(float(v.norm()) for v in ts) / 4], atol=1e-12)


# ----------------------------------------------------------------------------- nearswap


def test_nearswap_by_hand():
    base = T(0.0, 0.0, 0.0, 0.0, 1.0)
    b = T(0.5, 0.01, -0.2, 0.0, 1.3)
    # w = clamp(t/|a-b|): [0.2, 1, 0.5, 1 (|a-b| floored at 1e-6), 1/3]
    want = [0.1, 0.01, -0.1, 0.0, 1.0 + 0.3 / 3]
    close("nearswap", fn("nearswap")(base, [b], P(1, t=0.1)), want, atol=1e-15)
    close("nearswap", fn("nearswap")(base, [b], P(1, t=0.0)), base)
    close("nearswap", fn("nearswap")(base, [base.clone()], P(1, t=0.3)), base)


# ----------------------------------------------------------------------------- through `moe merge`


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny base and two perturbed fine-tunes of it (one lineage)."""
    tmp = tmp_path_factory.mktemp("family")
    cfg = ModelConfig(size="debug", dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24,
                      max_seq_len=16).resolved()  # fmt: skip
    torch.manual_seed(0)
    base_sd = Transformer(cfg).state_dict()
    meta0 = make_meta(kind="dense")
    paths = {"base": save_checkpoint(tmp / "base", base_sd, cfg, meta0)}
    for i, name in enumerate(("a", "b")):
        g = torch.Generator().manual_seed(i + 1)
        sd = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base_sd.items()}
        meta = make_meta(kind="dense", parents=[meta0["id"]], base_id=meta0["id"])
        paths[name] = save_checkpoint(tmp / name, sd, cfg, meta)
    return {k: str(v) for k, v in paths.items()}


def _yaml(tmp_path, d, name="m.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d))
    return str(p)


def _sds(family):
    return {k: load_checkpoint(v).state_dict for k, v in family.items()}


def test_model_stock_yaml_end_to_end(family, tmp_path):
    y = _yaml(tmp_path, {"merge_method": "model_stock", "base_model": family["base"],
                         "models": [{"model": family["a"]}, {"model": family["b"]}],
                         "parameters": {"filter_wise": False}, "out": str(tmp_path / "o")})
    assert main(["merge", y]) == 0
    got = load_checkpoint(tmp_path / "o").state_dict
    sd = _sds(family)
    for k, b in sd["base"].items():  # the closed form per tensor, flattened
        da, db = (sd["a"][k] - b).reshape(-1).double(), (sd["b"][k] - b).reshape(-1).double()
        c = float(da @ db) / max(float(da.norm() * db.norm()), 1e-6)
        t = 2 * c / (1 + c)
        want = t * (sd["a"][k].double() + sd["b"][k].double()) / 2 + (1 - t) * b.double()
        close("model_stock (moe merge, float32)", got[k], want, atol=1e-6)


def test_della_yaml_end_to_end_per_model_epsilon_and_deterministic(family, tmp_path):
    d = {"merge_method": "della", "base_model": family["base"],
         "models": [{"model": family["a"], "parameters": {"weight": 1.0, "epsilon": 0.1}},
                    {"model": family["b"], "parameters": {"weight": 0.5, "density": 0.7}}],
         "parameters": {"density": 0.5, "epsilon": 0.2, "lambda": 0.9, "seed": 7}}  # fmt: skip
    assert main(["merge", _yaml(tmp_path, d), "--out", str(tmp_path / "o1")]) == 0
    assert main(["merge", _yaml(tmp_path, d), "--out", str(tmp_path / "o2")]) == 0
    g1 = load_checkpoint(tmp_path / "o1").state_dict
    g2 = load_checkpoint(tmp_path / "o2").state_dict
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
    sd = _sds(family)
    cfg = merge_config_from_dict(d)
    for k, b in sd["base"].items():  # the method on each tensor with the resolved parameters
        p = MethodParams(weights=[1.0, 0.5], densities=[0.5, 0.7], normalize=True, scale=0.9,
                         seed=7, name=k, extra=cfg.method_params(k))  # fmt: skip
        assert list(p.extra["epsilon"]) == [0.1, 0.2]
        want = fn("della")(b.float(), [sd["a"][k].float(), sd["b"][k].float()], p)
        assert torch.equal(g1[k], want.to(g1[k].dtype)), k


@pytest.mark.parametrize("method,params,extra", [
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}, {}),
    ("nuslerp", {"nuslerp_flatten": False}, {}),
    ("nearswap", {"t": 0.01}, {"one": True}),
    ("sce", {"select_topk": 0.5}, {}),
    ("multislerp", {"normalize_weights": True, "eps": 1e-7}, {"nobase": True}),
    ("karcher", {"max_iter": 5, "tol": 1e-6}, {"nobase": True}),
])  # fmt: skip
def test_other_methods_run_through_moe_merge(family, tmp_path, method, params, extra):
    models = [{"model": family["a"]}] if extra.get("one") else [
        {"model": family["a"]}, {"model": family["b"]}]  # fmt: skip
    d = {"merge_method": method, "models": models, "parameters": params,
         "out": str(tmp_path / "o")}  # fmt: skip
    if not extra.get("nobase"):
        d["base_model"] = family["base"]
    assert main(["merge", _yaml(tmp_path, d)]) == 0
    got = load_checkpoint(tmp_path / "o").state_dict
    sd = _sds(family)
    cfg = merge_config_from_dict(d)
    k = "layers.1.attn.wq.weight"
    b = sd["base"][k] if "base_model" in d else None
    p = MethodParams(weights=[1.0] * len(models), densities=[cfg.density(i, k) for i in
                     range(len(models))], normalize=cfg.normalize(), t=cfg.t(k), name=k,
                     extra=cfg.method_params(k))  # fmt: skip
    want = fn(method)(b, [sd[m][k] for m in ("a", "b")[:len(models)]], p)
    assert torch.equal(got[k], want)


@pytest.mark.parametrize("method,models,params,model_params,msg", [
    ("breadcrumbs", 2, {"density": 0.5, "gamma": 1.0}, {}, "parameters.gamma must be in [0, 1)"),
    ("della", 2, {"density": 0.8, "epsilon": 0.3}, {},
     "parameters.epsilon: density 0.8 ± epsilon 0.3 must stay in [0, 1]"),
    ("della_linear", 2, {"density": 0.5}, {"epsilon": 0.6}, "models[1].parameters.epsilon"),
    ("sce", 2, {"select_topk": 0.0}, {}, "parameters.select_topk must be in (0, 1]"),
    ("ties", 2, {"gamma": 0.1}, {},
     "ties does not take gamma (taken by breadcrumbs, breadcrumbs_ties)"),
    ("dare_ties", 2, {}, {"epsilon": 0.1}, "models[1].parameters.epsilon: dare_ties does not take"),
    ("breadcrumbs", 2, {"gama": 0.1}, {}, "unknown key 'parameters.gama'"),
    ("model_stock", 2, {}, {"weight": 2.0}, "model_stock does not use weight"),
    ("model_stock", 1, {}, {}, "models: model_stock merges at least 2 models besides base_model"),
    ("nearswap", 1, {}, {}, "parameters.t: nearswap needs t"),
    ("nearswap", 2, {"t": 0.1}, {}, "nearswap merges exactly 1 model besides base_model, got 2"),
    ("nuslerp", 1, {}, {}, "nuslerp merges exactly 2 models, got 1"),
    ("karcher", 2, {"max_iter": 0}, {}, "parameters.max_iter must be at least 1"),
    ("multislerp", 2, {"eps": -1.0}, {}, "parameters.eps must be above 0"),
    ("model_stock", 2, {"filter_wise": "maybe"}, {}, "filter_wise"),
])  # fmt: skip
def test_bad_parameters_exit_2_one_line_nothing_written(family, tmp_path, capsys, method, models,
                                                        params, model_params, msg):  # fmt: skip
    ms = [{"model": family[m]} for m in ("a", "b")[:models]]
    if model_params:
        ms[-1]["parameters"] = model_params
    d = {"merge_method": method, "base_model": family["base"], "models": ms,
         "parameters": params, "out": str(tmp_path / "o")}  # fmt: skip
    assert main(["merge", _yaml(tmp_path, d)]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_della_density_gradient_checked_per_tensor(family, tmp_path, capsys):
    """A density gradient reaching 0.95 with ε = 0.15 leaves [0, 1] on some tensors only: the
    merge stops with one line and writes nothing."""
    d = {"merge_method": "della_linear", "base_model": family["base"],
         "models": [{"model": family["a"]}], "out": str(tmp_path / "o"),
         "parameters": {"density": [0.5, 0.95]}}  # fmt: skip
    assert main(["merge", _yaml(tmp_path, d)]) == 2
    err = capsys.readouterr().err
    assert "± epsilon 0.15 leaves [0, 1]" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_della_slices_equal_models_merge(family, tmp_path):
    """One slice over every layer, per-source epsilon: the same merge as the `models:` config."""
    par = {"density": 0.6, "epsilon": 0.2, "seed": 1}
    models = {"merge_method": "della", "base_model": family["base"], "parameters": par,
              "models": [{"model": family["a"], "parameters": {"epsilon": 0.05}},
                         {"model": family["b"]}]}  # fmt: skip
    sources = [{"model": family[m], "layer_range": [0, 2]} for m in ("base", "a", "b")]
    sources[1]["parameters"] = {"epsilon": 0.05}
    slices = {"merge_method": "della", "base_model": family["base"], "parameters": par,
              "slices": [{"sources": sources}]}  # fmt: skip
    assert main(["merge", _yaml(tmp_path, models, "m1.yaml"), "--out", str(tmp_path / "m")]) == 0
    assert main(["merge", _yaml(tmp_path, slices, "m2.yaml"), "--out", str(tmp_path / "s")]) == 0
    x, y = load_checkpoint(tmp_path / "m").state_dict, load_checkpoint(tmp_path / "s").state_dict
    assert x.keys() == y.keys()
    assert [k for k in x if not torch.equal(x[k], y[k])] == []
