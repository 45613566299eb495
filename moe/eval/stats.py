"""Small-sample statistics for comparing arms over seeds: Student t intervals, paired differences,
a paired bootstrap over seeds and held-out documents, Holm's correction, verdicts with a margin.

Plain functions on plain floats (no scipy; the bootstrap uses numpy). The t quantile comes from
the t distribution's CDF, written through the regularized incomplete beta function (evaluated by
its continued fraction), inverted by bisection.

Sign convention for `verdict` and `verdict_with_margin`: the numbers describe "arm − reference"
of a metric where lower is better (bits per byte), so an interval entirely below zero means the
arm beats the reference.
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


# ----------------------------------------------------------------------------- bootstrap and Holm
# The multi-seed study compares arms on the same held-out documents: every model of a seed scores
# the same documents, and the held-out split does not depend on the seed (moe/data/documents.py),
# so seeds and documents are two crossed sources of noise. The bootstrap below resamples both.

LN2 = math.log(2.0)

DocScores = tuple[Sequence[float], Sequence[float], Sequence[float]]  # nats of a, of b, bytes


def expansion(n: int, level: float = 0.95) -> float:
    """The small-sample widening of a percentile bootstrap over `n` values (n ≥ 2).

    sqrt(n / (n − 1)) · t_{(1+level)/2, n−1} / z_{(1+level)/2}: the resampled spread of n values
    is (n − 1)/n of the sample's, and their mean has t, not normal, tails (Hesterberg 2015, "What
    teachers should know about the bootstrap", the expanded percentile interval). With 3 seeds it
    is 2.69, with 5 1.58, with 30 1.06.
    """
    if n < 2:
        raise ValueError(f"expansion: needs at least two values, got {n}")
    p = (1.0 + level) / 2.0
    return math.sqrt(n / (n - 1)) * t_quantile(p, n - 1) / statistics.NormalDist().inv_cdf(p)


def _doc_counts(rng, rows: int, m: int):
    """(rows, m) counts of m documents drawn with replacement, one resample per row."""
    import numpy as np

    draws = rng.integers(0, m, size=(rows, m)) + m * np.arange(rows)[:, None]
    return np.bincount(draws.ravel(), minlength=rows * m).reshape(rows, m).astype(float)


def _group_replicates(dn: list, by: list, idx, rng, shared: bool, widen: float):
    """One domain's bootstrap replicates of the mean over seeds of its bpb difference.

    dn[s], by[s]: seed s's per-document nats difference (a − b) and bytes; idx (iters, n): the
    seeds drawn. shared: one document resample per replicate serves every seed (the same
    documents); else each drawn seed resamples its own. widen: seed deviations times (1 + widen).
    """
    import numpy as np

    iters, n = idx.shape
    point = np.array([d.sum() / b.sum() / LN2 for d, b in zip(dn, by)])
    with np.errstate(invalid="ignore", divide="ignore"):
        if shared:
            c = _doc_counts(rng, iters, len(by[0]))
            per_seed = (c @ np.stack(dn).T) / (c @ np.stack(by).T) / LN2  # (iters, n)
            drawn = np.take_along_axis(per_seed, idx, axis=1)
        else:
            drawn = np.empty((iters, n))
            for j in range(n):
                for s in range(n):
                    rows = np.flatnonzero(idx[:, j] == s)
                    if rows.size:
                        c = _doc_counts(rng, rows.size, len(by[s]))
                        drawn[rows, j] = (c @ dn[s]) / (c @ by[s]) / LN2
    drawn += widen * (point[idx] - point.mean())
    return point.mean(), drawn.mean(axis=1)


def bootstrap_groups(groups: Sequence[Sequence[DocScores]], iters: int = 2000,
                     level: float = 0.95, seed: int = 0, *, expand: bool = True,
                     shared_documents: bool | None = None) -> dict:  # fmt: skip
    """`paired_bootstrap` of the mean over several groups (domains) of their bpb differences.

    groups[g][s] is seed s's documents in group g (the same seeds, in the same order, in every
    group); the seeds drawn are the same for every group of a replicate, the documents are
    resampled per group.
    """
    import numpy as np

    if iters < 1:
        raise ValueError(f"bootstrap: iters must be at least 1, got {iters}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap: level must lie strictly between 0 and 1, got {level}")
    if not groups or not groups[0]:
        raise ValueError("bootstrap: no seeds")
    n = len(groups[0])
    if any(len(g) != n for g in groups):
        raise ValueError("bootstrap: every group needs the same seeds")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(iters, n)) if n > 1 else np.zeros((iters, 1), dtype=int)
    widen = expansion(n, level) - 1.0 if expand and n > 1 else 0.0
    means, reps, docs, all_shared = [], np.zeros(iters), 0, True
    for g in groups:
        dn, by = [], []
        for s, (a, b, nbytes) in enumerate(g):
            a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
            nbytes = np.asarray(nbytes, dtype=float)
            if not (a.shape == b.shape == nbytes.shape) or a.ndim != 1 or a.size == 0:
                raise ValueError(f"bootstrap: seed {s} needs as many nats of a and of b as "
                                 f"documents (got {a.shape}, {b.shape}, {nbytes.shape})")
            if not nbytes.sum() > 0:
                raise ValueError(f"bootstrap: seed {s}'s documents have no bytes")
            dn.append(a - b)
            by.append(nbytes)
        same = all(x.shape == by[0].shape and np.array_equal(x, by[0]) for x in by)
        shared = same if shared_documents is None else shared_documents
        if shared and not same:
            raise ValueError("bootstrap: shared_documents needs the same documents in every seed")
        all_shared &= shared
        mean, r = _group_replicates(dn, by, idx, rng, shared, widen)
        means.append(mean)
        reps += r
        docs += len(by[0])
    reps /= len(groups)
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        raise ValueError("bootstrap: no finite replicate")
    alpha = 1.0 - level
    lo, hi = np.quantile(reps, [alpha / 2.0, 1.0 - alpha / 2.0])
    below, above = int((reps <= 0.0).sum()), int((reps >= 0.0).sum())
    p = min(1.0, 2.0 * (min(below, above) + 1) / (reps.size + 1))
    return {"mean": float(np.mean(means)), "lo": float(lo), "hi": float(hi), "p": p,
            "level": level, "iters": iters, "seeds": n, "documents": docs,
            "shared_documents": all_shared, "expansion": widen + 1.0 if n > 1 and expand
            else None}  # fmt: skip


def paired_bootstrap(per_seed: Sequence[DocScores], iters: int = 2000, level: float = 0.95,
                     seed: int = 0, *, expand: bool = True,
                     shared_documents: bool | None = None) -> dict:  # fmt: skip
    """The bpb difference a − b over seeds and held-out documents, with a bootstrap interval.

    per_seed[s] = (nats of a per document, nats of b per document, bytes per document): both
    models scored on the same documents. Returns {"mean", "lo", "hi", "p", "level", "iters",
    "seeds", "documents", "shared_documents", "expansion"}:

    - mean: the mean over seeds of each seed's difference, bpb = sum(nats) / ln 2 / sum(bytes)
      (a ratio of sums, as the domain's bpb itself is: long documents weigh by their bytes; a
      mean of per-document bpb would let a 40-byte document count as much as a 4 KB one);
    - lo, hi: the `level` percentile interval of a hierarchical bootstrap: each replicate draws
      n seeds with replacement and, paired (a and b keep their documents), resamples the
      held-out documents with replacement, then recomputes every drawn seed's ratio of sums and
      averages them. Hierarchical because the two kinds of noise differ: seeds (training
      randomness) are few and the dominant term when arms are close, documents (which text was
      held out) are many; resampling only seeds ignores that the held-out set is a sample too,
      resampling only documents ignores that another seed trains another model;
    - shared_documents (None: detected, when every seed's document bytes are identical): the
      documents are the same in every seed (the study's held-out split does not depend on the
      seed), so one document resample serves every seed of a replicate (a crossed design); an
      independent resample per seed would average a document's effect away over the seeds and
      understate the document noise n-fold. Otherwise each drawn seed resamples its own;
    - expand: with a handful of seeds a percentile bootstrap is too narrow (3 seeds: it hardly
      reaches past the lowest and highest seed, ~75% coverage), so each seed's deviation from
      the mean is widened by `expansion(n, level)` (Hesterberg's expanded percentile interval,
      applied to the seed level only: the documents are many);
    - p: two-sided p-value of "difference = 0", 2 min(P*(d ≤ 0), P*(d ≥ 0)) over the replicates,
      counted as (k + 1) / (iters + 1) so it is never 0; p < 1 − level exactly when zero lies
      outside the interval (up to that +1).

    With one seed only documents are resampled: the interval is then conditional on the models
    trained, not on training. Deterministic given `seed` (numpy's default generator); vectorized:
    2,000 replicates of 5 seeds × 350 documents take a few tens of milliseconds.
    """
    return bootstrap_groups([per_seed], iters, level, seed, expand=expand,
                            shared_documents=shared_documents)


def mean_test_p(xs: Sequence[float], tie: float = 0.0) -> float | None:
    """Two-sided p-value of "mean = 0" from Student's t over the values (a paired t-test on
    differences); None with fewer than two values. Values without spread: 0 when their mean is
    beyond `tie` (float noise), else 1; NaN when a value is not finite."""
    xs = [float(x) for x in xs]
    if len(xs) < 2:
        return None
    if not all(math.isfinite(x) for x in xs):
        return math.nan
    mean, sd = statistics.fmean(xs), statistics.stdev(xs)
    if sd == 0.0:
        return 0.0 if abs(mean) > tie else 1.0
    t = abs(mean) / (sd / math.sqrt(len(xs)))
    return min(1.0, 2.0 * (1.0 - t_cdf(t, len(xs) - 1)))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the order given.

    Sorted ascending, the k-th smallest (k = 0, 1, ...) of m becomes (m − k) p_(k), made
    non-decreasing down the sorted list (step-down) and capped at 1; rejecting where the adjusted
    p < α keeps the chance of any false rejection among the m at most α, whatever their
    dependence (several domains of one model, and the mean over them, are far from independent).
    """
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [1.0] * m
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * float(pvalues[i])))
        out[i] = running
    return out


VERDICTS = ("wins", "loses", "tie", "wins (< margin)", "loses (< margin)", "not distinguishable")


def verdict_with_margin(mean: float, lo: float | None, hi: float | None, p_adj: float | None,
                        alpha: float = 0.05, margin: float = 0.01) -> str:  # fmt: skip
    """The verdict on an arm − reference difference (lower is better) with a practical margin.

    In this order:
    - "tie": the whole interval lo..hi lies strictly within ±margin, i.e. any difference is
      smaller than what counts (an equivalence test, TOST, each side at (1 − level)/2; it holds
      even when the difference is significant: 0.0015 bpb near DNA's 2-bit floor is a tie);
    - "wins" / "loses": the adjusted p-value (Holm across the table) is below `alpha` and the
      interval lies wholly below / above zero, with the mean at least `margin` away from zero;
      "wins (< margin)" / "loses (< margin)" when the mean is closer than that: a real but
      small difference, not shown to matter (nor, since the interval reaches past the margin,
      shown not to);
    - "not distinguishable": the rest.
    No test (p_adj None: a single seed): "one seed: not tested". The interval is per comparison
    (not widened for the others); only the decision that there is a difference is corrected,
    since that is the claim a table of many comparisons makes by chance.
    """
    if p_adj is None:
        return "one seed: not tested"
    if lo is None or hi is None or not all(map(math.isfinite, (mean, lo, hi, p_adj))):
        return "not distinguishable"
    if -margin < lo and hi < margin:
        return "tie"
    if p_adj < alpha and (hi < 0.0 or lo > 0.0):
        word = "wins" if hi < 0.0 else "loses"
        return word if abs(mean) >= margin else f"{word} (< margin)"
    return "not distinguishable"
