"""moe.eval.stats against tabulated t quantiles, closed forms and hand-computed intervals."""

import math
import statistics
import time

import numpy as np
import pytest

from moe.eval.stats import (
    betainc,
    bootstrap_groups,
    expansion,
    format_mean_ci,
    format_number,
    format_summary,
    holm,
    mean_ci,
    mean_test_p,
    paired_bootstrap,
    paired_diff_ci,
    sample_std,
    summarize,
    summarize_paired,
    t_cdf,
    t_quantile,
    verdict,
    verdict_with_margin,
)

# two-sided 95% multipliers from a printed t table (to the table's precision)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 29: 2.045}


@pytest.mark.parametrize("df,expected", sorted(T_975.items()))
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_closed_forms():
    # df = 1 is the Cauchy distribution: t = tan(pi (p - 1/2));
    # df = 2 has t = (2p - 1) / sqrt(2 p (1 - p))
    for p in (0.51, 0.6, 0.75, 0.9, 0.975, 0.995, 0.9995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)),
                                                 rel=1e-10)
    # many degrees of freedom: the normal quantile
    z = statistics.NormalDist().inv_cdf(0.975)
    assert t_quantile(0.975, 1e7) == pytest.approx(z, abs=1e-6)


def test_t_quantile_symmetry_and_inverse():
    assert t_quantile(0.5, 3) == 0.0
    assert t_quantile(0.025, 4) == pytest.approx(-t_quantile(0.975, 4), rel=1e-12)
    for df in (1, 2.5, 7, 40):
        for p in (0.001, 0.2, 0.5000001, 0.8, 0.999):
            assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)
    # near the centre the CDF rises with the density at 0: 1/(sqrt(3) B(1/2, 3/2)) for df = 3
    assert t_quantile(0.5 + 1e-6, 3) == pytest.approx(1e-6 * math.pi * math.sqrt(3) / 2,
                                                       rel=1e-6)


def test_t_cdf_and_betainc_by_hand():
    # df = 1: P(T <= 1) = 1/2 + atan(1)/pi = 3/4
    assert t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-14)
    # df = 2: P(T <= t) = 1/2 + t / (2 sqrt(2 + t^2)); t = 1 gives 1/2 + 1/(2 sqrt 3)
    assert t_cdf(1.0, 2) == pytest.approx(0.5 + 0.5 / math.sqrt(3), abs=1e-14)
    assert t_cdf(-math.inf, 3) == 0.0 and t_cdf(math.inf, 3) == 1.0
    # I_x(1, 1) = x; I_x(2, 1) = x^2; I_x(1, b) = 1 - (1 - x)^b
    assert betainc(1, 1, 0.3) == pytest.approx(0.3, abs=1e-14)
    assert betainc(2, 1, 0.3) == pytest.approx(0.09, abs=1e-14)
    assert betainc(1, 3, 0.8) == pytest.approx(1 - 0.2 ** 3, abs=1e-14)
    assert betainc(2.5, 4.0, 0.0) == 0.0 and betainc(2.5, 4.0, 1.0) == 1.0


def test_t_quantile_rejects_bad_arguments():
    for p, df in ((0.0, 3), (1.0, 3), (-0.1, 3), (0.975, 0), (0.975, -1), (0.975, math.inf)):
        with pytest.raises(ValueError):
            t_quantile(p, df)


def test_mean_ci_by_hand():
    # [1, 2, 3]: mean 2, s = 1, half = t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051 = 2.484138
    mean, half, n = mean_ci([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(2.484138, abs=1e-6)
    # [2, 4]: mean 3, s = sqrt 2, half = t(0.975, 1) sqrt(2) / sqrt(2) = 12.706205
    assert mean_ci([2.0, 4.0]) == pytest.approx((3.0, 12.706205, 2), abs=1e-6)
    # 90%: [2, 4] with t(0.95, 1) = 6.313752
    assert mean_ci([2.0, 4.0], level=0.90)[1] == pytest.approx(6.313752, abs=1e-6)
    # identical values: no spread, zero width
    assert mean_ci([0.5, 0.5, 0.5, 0.5]) == (0.5, 0.0, 4)
    # one value: no interval
    assert mean_ci([2.5]) == (2.5, None, 1)
    with pytest.raises(ValueError):
        mean_ci([])
    with pytest.raises(ValueError):
        mean_ci([1.0, 2.0], level=1.0)
    mean, half, n = mean_ci([1.0, math.nan])
    assert math.isnan(mean) and math.isnan(half) and n == 2


def test_paired_diff_ci_by_hand():
    # differences 0.05, 0.10, 0.15: mean 0.1, s = 0.05, half = 4.302653 * 0.05 / sqrt 3 = 0.124207
    mean, half, n = paired_diff_ci([2.30, 2.40, 2.50], [2.25, 2.30, 2.35])
    assert mean == pytest.approx(0.1, abs=1e-12) and n == 3
    assert half == pytest.approx(0.124207, abs=1e-6)
    # pairing removes a shared offset: each arm alone varies by 1.0, the difference by 0.02
    a = [1.00, 2.01, 3.00, 3.99, 5.00]
    b = [1.10, 2.10, 3.10, 4.10, 5.10]
    mean, half, n = paired_diff_ci(a, b)
    assert mean == pytest.approx(-0.1, abs=1e-12)
    # differences -0.1, -0.09, -0.1, -0.11, -0.1: s = sqrt(0.0002 / 4) = 0.0070711,
    # half = 2.776445 * 0.0070711 / sqrt 5 = 0.0087798
    assert half == pytest.approx(0.0087798, abs=1e-6)
    assert mean_ci(a)[1] > 100 * half
    assert paired_diff_ci([3.0], [2.0]) == (1.0, None, 1)
    with pytest.raises(ValueError):
        paired_diff_ci([1.0, 2.0], [1.0])


def test_verdict():
    assert verdict(-0.1, 0.02) == "beats"  # interval [-0.12, -0.08]: below zero, lower is better
    assert verdict(0.1, 0.02) == "loses"
    assert verdict(-0.01, 0.02) == "not distinguishable at 95%"
    assert verdict(0.01, 0.02) == "not distinguishable at 95%"
    assert verdict(-0.1, 0.0) == "beats"  # every seed agrees exactly
    assert verdict(1e-12, 0.0) == "not distinguishable at 95%"  # float noise is no difference
    assert verdict(-0.05, None) == "one seed: not tested"
    assert verdict(-0.05, 0.01, level=0.9) == "beats"
    assert verdict(0.0, 0.01, level=0.9) == "not distinguishable at 90%"
    assert verdict(math.nan, math.nan) == "not distinguishable at 95%"
    # the hand case above: mean -0.1 ± 0.0088 beats; mean 0.1 ± 0.124 is not distinguishable
    assert verdict(*paired_diff_ci([1.00, 2.01, 3.00, 3.99, 5.00],
                                   [1.10, 2.10, 3.10, 4.10, 5.10])[:2]) == "beats"
    assert verdict(*paired_diff_ci([2.30, 2.40, 2.50], [2.25, 2.30, 2.35])[:2]) == (
        "not distinguishable at 95%")


def test_summarize_by_hand():
    # [1, 2, 3]: mean 2, half 2.484138 (test_mean_ci_by_hand), n 3
    s = summarize([1.0, 2.0, 3.0])
    assert list(s) == ["mean", "half", "n"]
    assert s["mean"] == 2.0 and s["n"] == 3 and s["half"] == pytest.approx(2.484138, abs=1e-6)
    # a seed without a value (None) is left out; nothing at all: no mean, n 0
    assert summarize([None, 2.0, 4.0]) == summarize([2.0, 4.0])
    assert summarize([]) == {"mean": None, "half": None, "n": 0}
    assert summarize([None]) == {"mean": None, "half": None, "n": 0}
    assert summarize([2.5]) == {"mean": 2.5, "half": None, "n": 1}
    # detail: the sample std between mean and half, the values last; s of [1, 2, 3] is 1
    d = summarize([1, 2, 3], detail=True)
    assert list(d) == ["mean", "std", "half", "n", "values"]
    assert d["std"] == 1.0 and d["values"] == [1, 2, 3]
    assert summarize([], detail=True) == {"mean": None, "std": None, "half": None, "n": 0,
                                          "values": []}
    # 90%: [2, 4] with t(0.95, 1) = 6.313752
    assert summarize([2.0, 4.0], 0.90)["half"] == pytest.approx(6.313752, abs=1e-6)


def test_sample_std_by_hand():
    assert sample_std([1.0, 2.0, 3.0]) == 1.0
    assert sample_std([2.0, 4.0]) == pytest.approx(math.sqrt(2.0), rel=1e-15)
    assert sample_std([1.0]) is None and sample_std([]) is None
    assert math.isnan(sample_std([1.0, math.inf]))


def test_summarize_paired_by_hand():
    # differences 0.05, 0.10, 0.15: mean 0.1, half 0.124207 (test_paired_diff_ci_by_hand)
    s = summarize_paired([2.30, 2.40, 2.50], [2.25, 2.30, 2.35], with_verdict=True)
    assert list(s) == ["mean", "half", "n", "verdict"]
    assert s["mean"] == pytest.approx(0.1, abs=1e-12) and s["n"] == 3
    assert s["half"] == pytest.approx(0.124207, abs=1e-6)
    assert s["verdict"] == "not distinguishable at 95%"
    d = summarize_paired([3.0, 5.0], [1.0, 2.0], detail=True)
    assert d["values"] == [2.0, 3.0] and d["std"] == pytest.approx(math.sqrt(0.5), rel=1e-15)
    assert summarize_paired([], []) == {"mean": None, "half": None, "n": 0}
    assert summarize_paired([3.0], [2.0], with_verdict=True)["verdict"] == "one seed: not tested"
    with pytest.raises(ValueError):
        summarize_paired([1.0, 2.0], [1.0])


def test_format_number():
    assert format_number(1.23456) == "1.235" and format_number(1.23456, 1) == "1.2"
    assert format_number(2) == "2.000"
    assert format_number(0.05, signed=True) == "+0.050"
    assert format_number(-0.3124, signed=True, minus="\u2212") == "\u22120.312"
    assert format_number(-0.0001) == "-0.000"  # a tiny loss keeps its sign
    assert format_number(-1e-12, signed=True) == "-0.000"
    assert format_number(-1e-12, signed=True, tie=1e-9) == "+0.000"  # float noise: no sign
    assert format_number(-1e-12, tie=1e-9) == "-0.000"  # tie only applies to differences
    assert format_number(math.nan) == "nan" and format_number(math.inf, signed=True) == "+inf"


def test_format_mean_ci_styles():
    assert format_mean_ci(1.23456, 0.0104) == "1.235 ± 0.010"
    assert format_mean_ci(1.23456, 0.0104, 4) == "1.2346 ± 0.0104"
    assert format_mean_ci(None, 0.1) == "n/a"
    assert format_mean_ci(None, 0.1, missing="—") == "—"
    # one seed: the mean alone, or with a note
    assert format_mean_ci(2.0, None) == "2.000"
    assert format_mean_ci(2.0, None, single=" (n=1, no CI)") == "2.000 (n=1, no CI)"
    # an undefined (NaN) half-width: left out, written as Python does, or as a mark
    assert format_mean_ci(2.0, math.nan) == "2.000"
    assert format_mean_ci(2.0, math.nan, drop_nan_half=False) == "2.000 ± nan"
    assert format_mean_ci(2.0, math.nan, drop_nan_half=False, undefined="-") == "2.000 ± -"
    assert format_mean_ci(2.0, math.inf, undefined="-") == "2.000 ± -"
    assert format_mean_ci(math.nan, math.nan) == "nan"
    assert format_mean_ci(math.nan, 0.1, undefined="-") == "-"
    # differences: signed mean, unsigned half-width
    assert format_mean_ci(-0.1, 0.02, signed=True) == "-0.100 ± 0.020"
    assert format_mean_ci(0.1, 0.02, signed=True, minus="\u2212") == "+0.100 ± 0.020"
    assert format_mean_ci(-1e-12, 0.02, signed=True, tie=1e-9) == "+0.000 ± 0.020"
    # percentages: both numbers scaled, the unit once at the end
    assert format_mean_ci(0.125, 0.01, 1, scale=100.0, unit="%") == "12.5 ± 1.0%"
    assert format_mean_ci(0.125, None, 1, scale=100.0, unit="%") == "12.5%"


def test_format_summary():
    s = summarize([1.0, 2.0, 3.0])
    assert format_summary(s) == "2.000 ± 2.484"
    assert format_summary(s, 2, signed=True) == "+2.00 ± 2.48"
    assert format_summary(None) == "n/a" and format_summary(summarize([])) == "n/a"
    assert format_summary(None, missing="—") == "—"
    assert format_summary({"mean": 0.5}) == "0.500"  # no half-width: the mean alone


# ----------------------------------------------------------------------------- bootstrap, Holm

LN2 = math.log(2.0)


def _loop_reference(per_seed, iters, seed, shared, expand, level=0.95):
    """The bootstrap replicates by plain loops over the same random draws as `paired_bootstrap`
    (seeds first, then the documents: once per replicate when shared, else per drawn seed)."""
    rng = np.random.default_rng(seed)
    n = len(per_seed)
    idx = rng.integers(0, n, size=(iters, n)).tolist()
    diffs = [[a - b for a, b in zip(na, nb)] for na, nb, _ in per_seed]
    nbytes = [list(by) for _, _, by in per_seed]

    def ratio(s, docs):
        return sum(diffs[s][i] for i in docs) / sum(nbytes[s][i] for i in docs) / LN2

    point = [ratio(s, range(len(nbytes[s]))) for s in range(n)]
    centre = sum(point) / n
    k = expansion(n, level) if expand else 1.0
    docs = {}
    if shared:
        rows = rng.integers(0, len(nbytes[0]), size=(iters, len(nbytes[0]))).tolist()
        docs = {(r, j): rows[r] for r in range(iters) for j in range(n)}
    else:
        for j in range(n):
            for s in range(n):
                rows = [r for r in range(iters) if idx[r][j] == s]
                draws = rng.integers(0, len(nbytes[s]), size=(len(rows), len(nbytes[s])))
                docs.update({(r, j): d for r, d in zip(rows, draws.tolist())})
    reps = []
    for r in range(iters):
        vals = [ratio(idx[r][j], docs[r, j]) + (k - 1) * (point[idx[r][j]] - centre)
                for j in range(n)]
        reps.append(sum(vals) / n)
    return centre, reps


def _tiny(shared: bool):
    """3 seeds of 3-5 documents: nats of a, nats of b, bytes."""
    rng = np.random.default_rng(7)
    by0 = [120.0, 40.0, 300.0, 75.0]
    out = []
    for s in range(3):
        by = by0 if shared else list(rng.integers(20, 400, size=3 + s).astype(float))
        nb = [1.6 * b * rng.uniform(0.8, 1.2) for b in by]
        na = [x - 0.02 * b * rng.normal(1.0, 2.0) for x, b in zip(nb, by)]
        out.append((na, nb, by))
    return out


@pytest.mark.parametrize("shared,expand", [(True, True), (False, True), (False, False)])
def test_paired_bootstrap_matches_a_slow_loop(shared, expand):
    per_seed = _tiny(shared)
    got = paired_bootstrap(per_seed, iters=300, seed=11, expand=expand,
                           shared_documents=shared)  # fmt: skip
    centre, reps = _loop_reference(per_seed, 300, 11, shared, expand)
    assert got["mean"] == pytest.approx(centre, rel=1e-12)
    lo, hi = np.quantile(reps, [0.025, 0.975])
    assert (got["lo"], got["hi"]) == pytest.approx((lo, hi), rel=1e-9)
    below, above = sum(x <= 0 for x in reps), sum(x >= 0 for x in reps)
    assert got["p"] == pytest.approx(min(1.0, 2 * (min(below, above) + 1) / 301), rel=1e-12)
    assert got["shared_documents"] is shared and got["seeds"] == 3 and got["iters"] == 300
    assert got["expansion"] == (pytest.approx(expansion(3)) if expand else None)
    # detected: the same bytes in every seed are the same documents
    assert paired_bootstrap(per_seed, iters=300, seed=11, expand=expand) == got


def test_paired_bootstrap_point_is_a_ratio_of_sums():
    # seed 1: (3 + 4 − 1 − 1) nats over 5 bytes; a mean of per-document bpb would give
    # (2/1 + 3/4) / 2 / ln 2 instead. Seed 2: 1 nat over 10 bytes.
    s1 = ([3.0, 4.0], [1.0, 1.0], [1.0, 4.0])
    s2 = ([6.0], [5.0], [10.0])
    got = paired_bootstrap([s1, s2], iters=200)
    assert got["mean"] == pytest.approx((5 / 5 + 1 / 10) / 2 / LN2, rel=1e-12)
    assert not got["shared_documents"]
    # one seed: only its documents are resampled, nothing widened
    one = paired_bootstrap([s1], iters=200)
    assert one["mean"] == pytest.approx(1 / LN2) and one["expansion"] is None
    assert one["lo"] <= one["mean"] <= one["hi"]


def test_paired_bootstrap_edges_and_determinism():
    by = [100.0, 200.0, 300.0]
    same = [([50.0, 90.0, 170.0], [50.0, 90.0, 170.0], by)] * 4
    got = paired_bootstrap(same, iters=500)
    assert (got["mean"], got["lo"], got["hi"], got["p"]) == (0.0, 0.0, 0.0, 1.0)
    # a clear difference: every replicate below zero, p at its floor 2 / (iters + 1)
    better = [([40.0, 80.0, 150.0], [50.0, 90.0, 170.0], by)] * 4
    got = paired_bootstrap(better, iters=500)
    assert got["hi"] < 0 and got["p"] == pytest.approx(2 / 501)
    per_seed = _tiny(True)
    assert paired_bootstrap(per_seed, seed=3) == paired_bootstrap(per_seed, seed=3)
    assert paired_bootstrap(per_seed, seed=3)["lo"] != paired_bootstrap(per_seed, seed=4)["lo"]
    with pytest.raises(ValueError):
        paired_bootstrap([([1.0, 2.0], [1.0], [1.0, 1.0])])  # b lacks a document
    with pytest.raises(ValueError):
        paired_bootstrap([([1.0], [1.0], [0.0])])  # no bytes
    with pytest.raises(ValueError):
        paired_bootstrap(_tiny(False), shared_documents=True)
    with pytest.raises(ValueError):
        paired_bootstrap([], iters=10)
    with pytest.raises(ValueError):
        paired_bootstrap(per_seed, iters=0)


def test_bootstrap_groups_averages_the_domains():
    a, b = _tiny(True), _tiny(False)
    got = bootstrap_groups([a, b], iters=400)
    assert got["mean"] == pytest.approx((paired_bootstrap(a)["mean"]
                                         + paired_bootstrap(b)["mean"]) / 2, rel=1e-12)
    assert got["documents"] == 4 + 3 and got["lo"] < got["mean"] < got["hi"]
    with pytest.raises(ValueError):
        bootstrap_groups([a, b[:2]])  # every domain needs the same seeds


def test_paired_bootstrap_is_fast():
    rng = np.random.default_rng(0)
    by = rng.integers(50, 3000, size=350).astype(float)
    per_seed = [(rng.normal(1.6, 0.1, 350) * by, rng.normal(1.6, 0.1, 350) * by, by)
                for _ in range(5)]
    for shared in (True, False):
        t0 = time.perf_counter()
        paired_bootstrap(per_seed, iters=2000, shared_documents=shared)
        assert time.perf_counter() - t0 < 1.0


def _coverage(n, seed_sd, doc_sd, studies=200, **kw):
    """How often the 95% interval covers the true difference over simulated studies: n seeds
    scoring the same 100 documents, a seed effect, a document effect, and noise."""
    rng = np.random.default_rng(2024)
    truth, covered = 0.003, 0
    for k in range(studies):
        by = rng.integers(50, 800, size=100).astype(float)
        seed_fx, doc_fx = rng.normal(0, seed_sd, n), rng.normal(0, doc_sd, 100)
        per_seed = []
        for s in range(n):
            base = rng.normal(2.0, 0.1, 100) * by
            gap = LN2 * by * (truth + seed_fx[s] + doc_fx + rng.normal(0, 0.02, 100))
            per_seed.append((base + gap, base, by))
        got = paired_bootstrap(per_seed, iters=1000, seed=k, **kw)
        covered += got["lo"] <= truth <= got["hi"]
    return covered / studies


def test_paired_bootstrap_covers_the_truth():
    # seeds dominate (3 seeds) and documents dominate (5 seeds): the interval holds ~95%
    assert 0.90 <= _coverage(3, 0.02, 0.001) <= 0.99
    assert 0.90 <= _coverage(5, 0.0005, 0.05) <= 0.99
    assert 0.90 <= _coverage(5, 0.005, 0.05) <= 0.99
    # why the two design choices: a plain percentile bootstrap of 3 seeds is far too narrow,
    # and resampling each seed's documents on its own averages the shared documents' effect away
    assert _coverage(3, 0.02, 0.001, expand=False) < 0.85
    assert _coverage(5, 0.0005, 0.05, shared_documents=False) < 0.85


def test_expansion():
    z = statistics.NormalDist().inv_cdf(0.975)
    assert expansion(3) == pytest.approx(math.sqrt(1.5) * 4.302653 / z, rel=1e-6)
    assert expansion(3) == pytest.approx(2.689, abs=1e-3)
    assert expansion(5) == pytest.approx(1.584, abs=1e-3)
    assert 1.0 < expansion(1000) < 1.002
    with pytest.raises(ValueError):
        expansion(1)


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1 (0.5 × 2), and monotone
    assert holm([0.02]) == [0.02] and holm([]) == []
    assert holm([0.01, 0.01, 0.2]) == pytest.approx([0.03, 0.03, 0.2])
    # Bonferroni bounds it from above, the raw p-values from below
    ps = [0.001, 0.2, 0.013, 0.04, 0.7, 0.0004]
    for p, q in zip(ps, holm(ps)):
        assert p <= q <= min(1.0, len(ps) * p)


def test_mean_test_p_by_hand():
    # [1, 2, 3]: t = 2 / (1 / sqrt 3) = sqrt 12, df 2: p = 1 − t / sqrt(2 + t²) = 1 − sqrt(12/14)
    assert mean_test_p([1.0, 2.0, 3.0]) == pytest.approx(1 - math.sqrt(12 / 14), rel=1e-10)
    assert mean_test_p([1.0, -1.0]) == pytest.approx(1.0)
    assert mean_test_p([0.1, 0.1, 0.1]) == 0.0  # no spread, clearly nonzero
    assert mean_test_p([1e-12, 1e-12], tie=1e-9) == 1.0  # float noise is no difference
    assert mean_test_p([0.5]) is None
    assert math.isnan(mean_test_p([1.0, math.nan]))


def test_verdict_with_margin_every_branch():
    # tie: the whole interval within ±0.01, significant or not (0.0015 bpb near DNA's floor)
    assert verdict_with_margin(-0.0015, -0.003, -0.0005, 0.001) == "tie"
    assert verdict_with_margin(0.002, -0.004, 0.009, 0.6) == "tie"
    # wins / loses: the corrected test rejects and the mean is beyond the margin
    assert verdict_with_margin(-0.05, -0.07, -0.03, 0.004) == "wins"
    assert verdict_with_margin(0.05, 0.03, 0.07, 0.004) == "loses"
    assert verdict_with_margin(-0.01, -0.02, -0.001, 0.01) == "wins"  # |mean| = margin: counts
    # significant, but the mean within the margin while the interval reaches past it
    assert verdict_with_margin(-0.006, -0.012, -0.001, 0.02) == "wins (< margin)"
    assert verdict_with_margin(0.006, 0.001, 0.012, 0.02) == "loses (< margin)"
    # the same intervals, not significant after the correction
    assert verdict_with_margin(-0.05, -0.07, -0.03, 0.06) == "not distinguishable"
    assert verdict_with_margin(-0.006, -0.012, -0.001, 0.2) == "not distinguishable"
    # an interval across zero is never a win, whatever the p-value says
    assert verdict_with_margin(-0.05, -0.1, 0.01, 0.01) == "not distinguishable"
    # alpha and margin are parameters; margin 0 never calls a tie
    assert verdict_with_margin(-0.05, -0.07, -0.03, 0.06, alpha=0.1) == "wins"
    assert verdict_with_margin(0.0, 0.0, 0.0, 1.0, margin=0.0) == "not distinguishable"
    assert verdict_with_margin(0.0, 0.0, 0.0, 1.0) == "tie"  # identical models
    assert verdict_with_margin(-0.05, -0.07, -0.03, 0.004, margin=0.1) == "tie"
    # no test, or undefined numbers
    assert verdict_with_margin(-0.05, None, None, None) == "one seed: not tested"
    assert verdict_with_margin(math.nan, math.nan, math.nan, 0.01) == "not distinguishable"
