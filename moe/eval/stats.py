"""Small-sample statistics for comparing arms over seeds: Student t intervals, paired differences.

Plain functions on plain floats (no scipy). The t quantile comes from the t distribution's CDF,
written through the regularized incomplete beta function (evaluated by its continued fraction),
inverted by bisection.

Sign convention for `verdict`: the numbers describe "arm − reference" of a metric where lower is
better (bits per byte), so an interval entirely below zero means the arm beats the reference.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

_EPS = 1e-15  # relative precision the continued fraction stops at
_TINY = 1e-300  # keeps the continued fraction's recurrences away from division by zero
_MAX_TERMS = 10_000


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction 1 + d1/(1 + d2/(1 + ...)) of I_x(a, b), by the modified Lentz method.

    d_{2m+1} = -(a+m)(a+b+m) x / ((a+2m)(a+2m+1)),  d_{2m} = m(b-m) x / ((a+2m-1)(a+2m)).
    """
    f, c, d = 1.0, 1.0, 0.0
    for j in range(1, _MAX_TERMS):
        m, odd = divmod(j, 2)
        if odd:
            coef = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            coef = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + coef * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + coef / c
        c = c if abs(c) > _TINY else _TINY
        step = c * d
        f *= step
        if abs(step - 1.0) < _EPS:
            return f
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc: a and b must be positive, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x must lie in [0, 1], got {x}")
    if x == 0.0 or x == 1.0:
        return x
    # the continued fraction converges fast below (a+1)/(a+b+2); above it, use
    # I_x(a, b) = 1 - I_{1-x}(b, a)
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = (a * math.log(x) + b * math.log1p(-x)
                 + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b))
    return math.exp(log_front) / (a * _betacf(a, b, x))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom (df > 0, not necessarily whole)."""
    if not (df > 0 and math.isfinite(df)):
        raise ValueError(f"t_cdf: degrees of freedom must be positive and finite, got {df}")
    if math.isnan(t):
        raise ValueError("t_cdf: t is NaN")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    t2 = t * t
    if t2 < df:
        # near zero df/(df+t^2) rounds to 1: use P(|T| <= |t|) = I_{t^2/(df+t^2)}(1/2, df/2)
        half_mass = 0.5 * betainc(0.5, df / 2.0, t2 / (df + t2))
        return 0.5 + half_mass if t >= 0 else 0.5 - half_mass
    # P(|T| > |t|) = I_{df/(df+t^2)}(df/2, 1/2)
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t2))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t such that P(T <= t) = p, for Student's t with `df` degrees of freedom; 0 < p < 1.

    E.g. t_quantile(0.975, 4) = 2.776..., the multiplier of a two-sided 95% interval from 5
    values. Bisection on the CDF, to about 1e-12 relative.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must lie strictly between 0 and 1, got {p}")
    if not (df > 0 and math.isfinite(df)):
        raise ValueError(f"t_quantile: degrees of freedom must be positive and finite, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


def mean_ci(xs: Sequence[float], level: float = 0.95) -> tuple[float, float | None, int]:
    """(mean, half-width of the two-sided `level` confidence interval, n) of a sample.

    The interval is mean ± t_{(1+level)/2, n-1} · s / √n with s the sample standard deviation
    (Student t, as for a handful of seeds). With a single value there is no interval: the half
    width is None. An empty sample is an error.
    """
    xs = [float(x) for x in xs]
    n = len(xs)
    if n == 0:
        raise ValueError("mean_ci: no values")
    if not 0.0 < level < 1.0:
        raise ValueError(f"mean_ci: level must lie strictly between 0 and 1, got {level}")
    mean = statistics.fmean(xs)
    if n == 1:
        return mean, None, 1
    if not all(math.isfinite(x) for x in xs):
        return mean, math.nan, n  # no interval around an infinite or undefined value
    half = t_quantile((1.0 + level) / 2.0, n - 1) * statistics.stdev(xs) / math.sqrt(n)
    return mean, half, n


def paired_diff_ci(a: Sequence[float], b: Sequence[float],
                   level: float = 0.95) -> tuple[float, float | None, int]:
    """`mean_ci` of the paired differences a[i] - b[i] (e.g. arm minus reference, same seed).

    Pairing removes what both share (the seed's data order and initialisation), so the interval
    is usually much narrower than the two arms' own intervals suggest.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_diff_ci: {len(a)} values against {len(b)}; pairs need both")
    return mean_ci([x - y for x, y in zip(a, b)], level)


def verdict(mean: float, half: float | None, level: float = 0.95, tie: float = 1e-9) -> str:
    """The verdict on an arm − reference difference: "beats", "loses" or "not distinguishable".

    Lower is better: "beats" when the whole interval mean ± half lies below zero, "loses" when it
    lies above; differences within `tie` of zero count as zero (float noise). Without an interval
    (half None: a single seed) nothing is tested: "one seed: not tested".
    """
    if half is None:
        return "one seed: not tested"
    if not (math.isfinite(mean) and math.isfinite(half)):
        return f"not distinguishable at {100 * level:g}%"
    if mean + half < -tie:
        return "beats"
    if mean - half > tie:
        return "loses"
    return f"not distinguishable at {100 * level:g}%"


# ----------------------------------------------------------------------------- summaries and text
# One summary of a list of per-seed values, and one way to write it, for every report. The
# reports differ in their conventions (digits, a "+" on differences, the minus sign, the mark of
# a missing value, what a single seed or an undefined interval reads as); those are parameters
# here, so every report's text stays what it was.


def sample_std(xs: Sequence[float]) -> float | None:
    """Sample standard deviation; None with fewer than two values, NaN if one is not finite."""
    if len(xs) < 2:
        return None
    return statistics.stdev(xs) if all(math.isfinite(x) for x in xs) else math.nan


def _summary(mean, half, n, values, detail: bool) -> dict:
    if detail:
        return {"mean": mean, "std": sample_std(values), "half": half, "n": n,
                "values": values}  # fmt: skip
    return {"mean": mean, "half": half, "n": n}


def summarize(xs: Sequence[float | None], level: float = 0.95, *, detail: bool = False) -> dict:
    """{"mean", "half", "n"} of per-seed values (`mean_ci`), missing values (None) left out.

    No value at all: mean and half None, n 0. `detail` adds the sample std ("std", between mean
    and half) and the values themselves ("values", last).
    """
    vals = [x for x in xs if x is not None]
    if not vals:
        return _summary(None, None, 0, [], detail)
    mean, half, n = mean_ci(vals, level)
    return _summary(mean, half, n, vals, detail)


def summarize_paired(a: Sequence[float], b: Sequence[float], level: float = 0.95, *,
                     detail: bool = False, with_verdict: bool = False) -> dict:  # fmt: skip
    """`summarize` of the paired differences a[i] − b[i] (`paired_diff_ci`).

    `with_verdict` adds "verdict" (`verdict` at `level`); `detail` adds "std" and "values" (the
    differences). No pair at all: mean and half None, n 0.
    """
    if not a:
        return _summary(None, None, 0, [], detail)
    mean, half, n = paired_diff_ci(a, b, level)
    out = _summary(mean, half, n, [x - y for x, y in zip(a, b)], detail)
    if with_verdict:
        out["verdict"] = verdict(mean, half, level)
    return out


def format_number(x: float, digits: int = 3, *, signed: bool = False, minus: str = "-",
                  tie: float = 0.0) -> str:  # fmt: skip
    """Fixed point with `digits` decimals ("1.234"); non-finite values as Python writes them.

    signed: a "+" on values ≥ 0 ("+0.050"), and |x| < `tie` reads as +0 (float noise from
    subtracting equal numbers must not read as a gain or a loss); minus: the character written
    for "-" (the reports of the study use the typographic minus, U+2212).
    """
    if signed:
        if abs(x) < tie:
            x = 0.0
        text = f"{x:+.{digits}f}"
    else:
        text = f"{x:.{digits}f}"
    return text.replace("-", minus) if minus != "-" else text


def format_mean_ci(mean: float | None, half: float | None, digits: int = 3, *,
                   signed: bool = False, scale: float = 1.0, unit: str = "", minus: str = "-",
                   tie: float = 0.0, missing: str = "n/a", single: str = "",
                   undefined: str | None = None, drop_nan_half: bool = True) -> str:  # fmt: skip
    """A mean and its interval's half-width as "1.234 ± 0.010".

    digits, signed, minus, tie   how each number is written (`format_number`; the half-width is
                                 never signed)
    scale, unit                  both numbers times `scale`, then `unit` ("12.5 ± 1.0%")
    missing                      the whole text when there is no mean (None)
    single                       appended to the mean when there is no interval (half None: one
                                 seed), e.g. " (n=1, no CI)"
    drop_nan_half                a NaN half-width (a seed's value was not finite) means no
                                 interval either, as with one seed; False writes it
    undefined                    the text of a number that is not finite; a mean that is not
                                 finite then makes the whole text `undefined`. None: Python's
                                 own ("nan", "inf")
    """
    if mean is None:
        return missing
    if undefined is not None and not math.isfinite(mean):
        return undefined

    def num(x: float, sign: bool) -> str:
        if undefined is not None and not math.isfinite(x):
            return undefined
        return format_number(scale * x if scale != 1.0 else x, digits, signed=sign, minus=minus,
                             tie=tie)  # fmt: skip

    text = num(mean, signed)
    if half is None or (drop_nan_half and isinstance(half, float) and math.isnan(half)):
        return f"{text}{unit}{single}"
    return f"{text} ± {num(half, False)}{unit}"


def format_summary(s: dict | None, digits: int = 3, **style) -> str:
    """`format_mean_ci` of a `summarize` dict (or any dict with "mean" and "half"); no dict, or
    one without a mean, reads `missing`."""
    if s is None or s.get("mean") is None:
        return style.get("missing", "n/a")
    return format_mean_ci(s["mean"], s.get("half"), digits, **style)
