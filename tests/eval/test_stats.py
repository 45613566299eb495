"""moe.eval.stats against tabulated t quantiles, closed forms and hand-computed intervals."""

import math
import statistics

import pytest

from moe.eval.stats import (
    betainc,
    format_mean_ci,
    format_number,
    format_summary,
    mean_ci,
    paired_diff_ci,
    sample_std,
    summarize,
    summarize_paired,
    t_cdf,
    t_quantile,
    verdict,
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
