"""The tests behind the multi-seed and sweep reports' verdicts on gains over the reference.

Each gain (arm − reference bpb, one arm and one domain, or the mean over domains) gets a test:
a hierarchical paired bootstrap over seeds and held-out documents (`moe.eval.stats.
paired_bootstrap`) when every seed of both models kept its per-document scores, else Student t
over the seeds' paired differences (results.json files written before per-document scores, or
the chunks evaluation protocol, which has none). Then the p-values of every test in a report's
table are Holm-corrected together, and each verdict is `verdict_with_margin` with the study's
equivalence margin (`study.equivalence_margin`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from moe.eval.stats import (
    bootstrap_groups,
    holm,
    mean_ci,
    mean_test_p,
    verdict_with_margin,
)
from moe.experiments.study.report.format import (
    TIE,
    format_count,
    format_delta,
    format_mean_ci,
    is_num,
)

MARGIN = 0.01  # bpb: the default equivalence margin, below which a difference is a tie
ITERS = 2000  # the default number of bootstrap resamples
BOOTSTRAP_SEED = 0  # every test draws from the same generator state: the report is reproducible

DocScores = tuple[list[float], list[float], list[float]]


def documents(a: dict | None, b: dict | None, domain: str) -> DocScores | None:
    """(a's nats, b's nats, bytes) per held-out document of a domain, or None when either model
    lacks them or they are not the same documents (their counts or bytes differ)."""
    pa = (((a or {}).get("eval") or {}).get(domain) or {}).get("per_document") or {}
    pb = (((b or {}).get("eval") or {}).get(domain) or {}).get("per_document") or {}
    na, nb, by = pa.get("nats"), pb.get("nats"), pa.get("bytes")
    if not (na and nb and by) or not (len(na) == len(nb) == len(by)) or pb.get("bytes") != by:
        return None
    return na, nb, by


def bootstrap_resamples(iters: int, comparisons: int, alpha: float) -> int:
    """`iters`, raised so that a bootstrap p-value can survive a Holm correction over
    `comparisons` tests: its smallest value is 2 / (B + 1) (`paired_bootstrap`), and the most
    significant of K tests is multiplied by K, so B + 1 ≥ 4K / α leaves it at α / 2 at most.
    (2,000 resamples serve 25 comparisons at α = 0.05; a sweep of 4 values × 24 needs 7,680.)"""
    return max(int(iters), math.ceil(4 * comparisons / alpha) - 1)


def gain_test(diffs: Sequence[float], groups: list[list[DocScores]] | None, iters: int,
              level: float) -> dict[str, Any] | None:  # fmt: skip
    """The test of one gain: {"method", "mean", "lo", "hi", "p", ...}; None with under 2 seeds.

    `diffs`: each seed's arm − reference bpb; `groups`: per domain (one, or every domain for the
    mean column), each seed's documents, the seeds in the order of `diffs` (None: not every seed
    has them, so Student t over `diffs`).
    """
    if len(diffs) < 2:
        return None
    if groups is not None:
        try:
            b = bootstrap_groups(groups, iters, level, BOOTSTRAP_SEED)
        except ValueError:
            b = None  # e.g. a seed's documents have no bytes: fall back to t
        if b is not None:
            return {"method": "bootstrap", "mean": b["mean"], "lo": b["lo"], "hi": b["hi"],
                    "p": b["p"], "iters": iters, "documents": b["documents"],
                    "expansion": b["expansion"], "shared_documents": b["shared_documents"]}
    mean, half, _ = mean_ci(diffs, level)  # two values or more: half is a number
    return {"method": "t", "mean": mean, "lo": mean - half, "hi": mean + half,
            "p": mean_test_p(diffs, TIE)}


def holm_verdicts(tables: list[tuple[dict, float]], alpha: float) -> int:
    """Holm-correct every test of the given gain tables together and set each cell's verdict.

    tables: (label -> column -> cell, equivalence margin); a cell is {"test", ...} as the
    aggregate writes it (one without "test", from an older aggregate, is tested by t over its
    "delta" "values"). Sets "p_holm" in each test and "verdict" in each cell (a cell without a
    test and with seeds: "one seed: not tested"). Returns how many comparisons were corrected.
    """
    for t, _ in tables:  # an aggregate written before these tests: t over its seeds' values
        for c in (c for row in t.values() for c in row.values() if "test" not in c):
            c["test"] = gain_test((c.get("delta") or {}).get("values") or [], None, 0,
                                  1.0 - alpha)  # fmt: skip
    tests = [c["test"] for t, _ in tables for row in t.values() for c in row.values()
             if c.get("test") and is_num(c["test"].get("p"))]
    for t, p in zip(tests, holm([t["p"] for t in tests])):
        t["p_holm"] = p
    for t, margin in tables:
        for row in t.values():
            for c in row.values():
                test = c.get("test")
                if test is None:
                    c["verdict"] = "one seed: not tested" if (c.get("delta") or {}).get("n") \
                        else None
                    continue
                c["verdict"] = verdict_with_margin(test["mean"], test["lo"], test["hi"],
                                                   test.get("p_holm", float("nan")), alpha,
                                                   margin)  # fmt: skip
    return len(tests)


def interval_text(test: dict | None, delta: dict) -> str:
    """A gain and its interval: "−0.050 [−0.071, −0.030]" (bootstrap: percentile, asymmetric),
    "−0.050 ± 0.010" (t), "−0.050 (n=1, no CI)" (one seed)."""
    if test and test["method"] == "bootstrap":
        return (f"{format_delta(test['mean'])} "
                f"[{format_delta(test['lo'])}, {format_delta(test['hi'])}]")
    return format_mean_ci(delta["mean"], delta["half"], signed=True)


def p_text(test: dict | None) -> str:
    """The Holm-adjusted p-value of a test: "p=0.012", "p<0.001"; "" without one."""
    p = (test or {}).get("p_holm")
    if not is_num(p):
        return ""
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def method_text(gains: dict, doms: Sequence[str], n: int, level: float, margin: float,
                comparisons: int, iters: int = ITERS) -> str:  # fmt: skip
    """What the intervals and verdicts of a gains table are, to state above it."""
    tests = [c["test"] for row in gains.values() for c in row.values() if c.get("test")]
    if not tests:
        return ("Verdicts: none tested (one seed, or no paired values): with a single seed "
                "there is no interval.")
    pct = f"{100 * level:g}%"
    boot = [t for t in tests if t["method"] == "bootstrap"]
    parts = []
    if boot:
        docs = {}
        for d in doms:
            t = next((c["test"] for row in gains.values() if (c := row.get(d)) and c.get("test")
                      and c["test"]["method"] == "bootstrap"), None)  # fmt: skip
            if t:
                docs[d] = t["documents"]
        shared = all(t.get("shared_documents") for t in boot)
        ks_all = {round(t["expansion"], 2) for t in boot if t.get("expansion")}
        k = next(iter(ks_all)) if len(ks_all) == 1 else None  # one number: every cell, n seeds
        parts.append(
            f"Intervals: hierarchical paired bootstrap over the {n} seeds and the held-out "
            f"documents ({', '.join(f'{d} {format_count(m)}' for d, m in docs.items())}), "
            f"{format_count(boot[0]['iters'])} resamples"
            + (f" (study.bootstrap_iters {format_count(iters)}, raised so that the smallest "
               "bootstrap p-value can survive the correction)" if boot[0]["iters"] > iters
               else "")
            + f"; {pct} percentile intervals of the "
            "mean over seeds of each seed's ratio-of-sums bpb difference, "
            + ("each resample drawing one set of documents for every seed (they score the same "
               "documents)" if shared else "each drawn seed resampling its own documents")
            + (f", the seeds' spread widened ×{k:.2f} for {n} seeds (expanded percentile "
               "interval)" if k else ", the seeds' spread widened for their number (expanded "
               "percentile interval)" if ks_all else "") + ".")
    if len(boot) < len(tests):
        where = "these results hold no per-document scores" if not boot else \
            "cells without per-document scores in every seed"
        parts.append(f"{'Intervals' if not boot else 'Elsewhere'}: Student t over the seeds' "
                     f"paired differences (n − 1 degrees of freedom; {where}, so the held-out "
                     "documents' own noise is not in them), \"mean ± half-width\".")
    parts.append(
        f"Verdicts: Holm-corrected across the table's {comparisons} comparisons (every arm "
        f"and domain, the mean column included), α = {1 - level:.2g}; equivalence margin "
        f"{margin:g} bpb: \"tie\" when the whole interval lies within ±{margin:g} bpb, \"wins\" / "
        "\"loses\" when the corrected test rejects zero with the mean beyond the margin "
        "(\"(< margin)\": within it), else \"not distinguishable\". Intervals are per "
        "comparison; only the verdicts are corrected.")
    return " ".join(parts)
