"""Each merge method's definition on small tensors worked out by hand."""

import math

import pytest
import torch

from moe.merge import registry
from moe.merge.registry import MethodParams
from moe.merge.slerp import slerp_tensors
from moe.merge.ties import trim


def P(n=2, weights=None, densities=None, normalize=False, scale=1.0, t=0.5, seed=0, name="w"):
    return MethodParams(
        weights=weights or [1.0] * n,
        densities=densities or [1.0] * n,
        normalize=normalize,
        scale=scale,
        t=t,
        seed=seed,
        name=name,
    )


def fn(name):
    return registry.get(name).fn


def T(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_registry_names_and_unknown():
    assert registry.names() == [
        "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della", "della_linear",
        "karcher", "linear", "model_stock", "multislerp", "nearswap", "nuslerp", "passthrough",
        "sce", "slerp", "task_arithmetic", "ties",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown method 'soup'"):
        registry.get("soup")


def test_linear_weighted_mean_and_sum():
    a, b = T([1.0, 2.0]), T([3.0, 6.0])
    got = fn("linear")(None, [a, b], P(weights=[1.0, 3.0], normalize=True))
    torch.testing.assert_close(got, T([2.5, 5.0]))  # (1*1 + 3*3)/4, (2 + 18)/4
    got = fn("linear")(None, [a, b], P(weights=[1.0, 3.0], normalize=False))
    torch.testing.assert_close(got, T([10.0, 20.0]))


def test_task_arithmetic():
    base, a, b = T([1.0, 1.0]), T([2.0, 0.0]), T([1.0, 3.0])
    # base + λ Σ w (θ - base) = [1,1] + 0.5 * (1*[1,-1] + 2*[0,2]) = [1.5, 2.5]
    got = fn("task_arithmetic")(base, [a, b], P(weights=[1.0, 2.0], scale=0.5))
    torch.testing.assert_close(got, T([1.5, 2.5]))
    got = fn("task_arithmetic")(base, [a, b], P(weights=[1.0, 2.0], scale=0.5, normalize=True))
    torch.testing.assert_close(got, T([1.0 + 0.5 / 3, 1.0 + 1.5 / 3]))
    with pytest.raises(ValueError, match="base"):
        fn("task_arithmetic")(None, [a, b], P())


def test_ties_by_hand():
    base = torch.zeros(2, 3, dtype=torch.float64)
    a = T([1.0, -2.0, 3.0], [0.5, 4.0, -1.0])
    b = T([-3.0, 1.0, 2.0], [0.2, -1.0, -2.0])
    # trim to density 0.5 (3 of 6 entries by magnitude)
    ta, tb = trim(a, 0.5), trim(b, 0.5)
    torch.testing.assert_close(ta, T([0.0, -2.0, 3.0], [0.0, 4.0, 0.0]))
    torch.testing.assert_close(tb, T([-3.0, 0.0, 2.0], [0.0, 0.0, -2.0]))
    # elected signs of ta + tb = [[-3,-2,5],[0,4,-2]] -> [[-,-,+],[0,+,-]];
    # disjoint mean over the agreeing entries: [[-3, -2, (3+2)/2], [0, 4, -2]]
    got = fn("ties")(base, [a, b], P(densities=[0.5, 0.5], normalize=True))
    torch.testing.assert_close(got, T([-3.0, -2.0, 2.5], [0.0, 4.0, -2.0]))
    # normalize: false is the disjoint sum; λ scales the merged task vector; base is added back
    got = fn("ties")(base + 1, [a + 1, b + 1], P(densities=[0.5, 0.5], scale=2.0))
    torch.testing.assert_close(got, 1 + 2 * T([-3.0, -2.0, 5.0], [0.0, 4.0, -2.0]))


def test_ties_weighted_election():
    base = torch.zeros(1, dtype=torch.float64)
    a, b = T(1.0), T(-2.0)
    # weights 3, 1: 3*1 - 2 > 0, so the positive sign wins although |b| > |a|
    got = fn("ties")(base, [a, b], P(weights=[3.0, 1.0], normalize=True))
    torch.testing.assert_close(got, T(1.0))


@pytest.mark.parametrize(
    "variant,plain", [("dare_linear", "task_arithmetic"), ("dare_ties", "ties")]
)
def test_dare_density_one_equals_undropped(variant, plain):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=g, dtype=torch.float64)
    ts = [base + torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    p = P(n=3, weights=[1.0, 0.5, 2.0], scale=0.7, normalize=True)
    torch.testing.assert_close(fn(variant)(base, ts, p), fn(plain)(base, ts, p))


def test_dare_preserves_expectation_and_is_seeded():
    base = torch.zeros(200_000, dtype=torch.float64)
    delta = torch.ones(200_000, dtype=torch.float64)
    p = P(n=1, densities=[0.3], seed=7, name="layers.0.ffn.w1.weight")
    got = fn("dare_linear")(base, [delta], p)
    kept = (got != 0).double().mean().item()
    assert abs(kept - 0.3) < 0.005  # Bernoulli(0.3) keep rate
    assert torch.all((got == 0) | (got - 1 / 0.3).abs().lt(1e-12))  # survivors rescaled
    assert abs(got.mean().item() - 1.0) < 0.02  # E[δ̃] = δ
    torch.testing.assert_close(fn("dare_linear")(base, [delta], p), got)  # same seed, same merge
    other = fn("dare_linear")(base, [delta], P(n=1, densities=[0.3], seed=8, name=p.name))
    assert not torch.equal(other, got)
    other_name = fn("dare_linear")(base, [delta], P(n=1, densities=[0.3], seed=7, name="x"))
    assert not torch.equal(other_name, got)  # each tensor draws its own mask


def test_dare_ties_drops_then_elects():
    base = torch.zeros(4, dtype=torch.float64)
    a, b = T(1.0, 1.0, 1.0, 1.0), T(-1.0, -1.0, -1.0, -1.0)
    got = fn("dare_ties")(base, [a, b], P(densities=[0.5, 0.5], seed=3, normalize=True))
    # survivors are ±2; where both survive the signs cancel (elected 0), else the survivor wins
    assert set(got.tolist()) <= {0.0, 2.0, -2.0}


def test_slerp_endpoints_midpoint_and_parallel_fallback():
    v0, v1 = T(1.0, 0.0), T(0.0, 1.0)
    torch.testing.assert_close(slerp_tensors(0.0, v0, v1), v0)
    torch.testing.assert_close(slerp_tensors(1.0, v0, v1), v1)
    h = math.sqrt(0.5)
    torch.testing.assert_close(slerp_tensors(0.5, v0, v1), T(h, h))  # on the unit circle
    near = T(1.0, 1e-3)  # cos Ω > 0.9995: linear interpolation
    torch.testing.assert_close(slerp_tensors(0.25, v0, near), 0.75 * v0 + 0.25 * near)
    torch.testing.assert_close(slerp_tensors(0.5, v0, torch.zeros(2, dtype=torch.float64)),
                               0.5 * v0)  # fmt: skip
    got = fn("slerp")(None, [v0, v1], P(t=0.5))
    torch.testing.assert_close(got, T(h, h))
    # float32 in, float32 out
    assert slerp_tensors(0.3, v0.float(), v1.float()).dtype == torch.float32
