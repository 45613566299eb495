"""Several seeds of one study: `aggregate` combines their results, and its report.

Every bpb is a mean over seeds with the half-width of its 95% confidence interval (Student t,
n − 1 degrees of freedom; `moe.eval.stats`). Gains over the reference are paired: each seed's
arm − reference difference first; their interval and test combine the seeds and the held-out
documents (a hierarchical paired bootstrap) when every seed kept its per-document scores, else
Student t over the seeds (./verdicts.py). The verdicts ("wins", "loses", "tie" within the
equivalence margin, "not distinguishable") are Holm-corrected across each table. With one seed
there is no interval and nothing is tested.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moe.eval.stats import summarize, summarize_paired
from moe.experiments.study.report.format import (
    TIE,
    bold,
    format_delta,
    format_mean_ci,
    format_pct,
    format_seconds,
    format_table,
    is_num,
    routing_accuracy_lines,
)
from moe.experiments.study.report.plots import BPB_PLOT, PLOTS_DIR, plot_aggregate
from moe.experiments.study.report.results import (
    arm_table,
    command_line,
    complete_mean,
    domains,
    eval_sets_view,
    experts_arm,
    model_bpb,
    reference,
)
from moe.experiments.study.report.verdicts import (
    ITERS,
    MARGIN,
    bootstrap_resamples,
    documents,
    gain_test,
    holm_verdicts,
    interval_text,
    method_text,
    p_text,
)
from moe.io.checkpoint import atomic_write_text

LEVEL = 0.95  # confidence level of every interval in the aggregate report


def _stats(xs: Sequence[float]) -> dict[str, Any]:
    """mean, sample std, CI half-width (both None with one value), n, and the values themselves."""
    return summarize(xs, LEVEL, detail=True)


def _paired(xs: Sequence[float], ys: Sequence[float]) -> dict[str, Any]:
    """`_stats` of the per-seed differences xs[i] − ys[i], interval from `paired_diff_ci`."""
    return summarize_paired(xs, ys, LEVEL, detail=True)


def aggregate(results_list: list[dict], *, margin: float | None = None,
              iters: int | None = None, family: int = 1) -> dict:  # fmt: skip
    """Combine the results of N seeds of one study into per-arm mean ± 95% CI (and sample std).

    Gains are paired: each seed's arm − reference difference first, summarized over seeds
    ("delta": the seed-to-seed noise shared by both arms cancels), then tested ("test": a
    bootstrap over seeds and documents, or t over seeds; ./verdicts.py) and given a verdict,
    Holm-corrected across the table, with the equivalence margin. `margin` and `iters` (bootstrap
    resamples) default to the study's (`study.equivalence_margin`, `study.bootstrap_iters`,
    recorded in each results.json); `iters` is raised where the table's comparisons, times
    `family` (how many such tables one correction spans: a sweep's values), need finer p-values.
    A model or domain missing in some seeds contributes only the seeds that have it; `n` says
    how many.
    """
    if not results_list:
        raise ValueError("aggregate: no results")
    first = results_list[0]
    margin = float(first.get("equivalence_margin", MARGIN) if margin is None else margin)
    iters = int(first.get("bootstrap_iters", ITERS) if iters is None else iters)
    doms = domains(first)
    arms: dict[str, str] = {}
    for r in results_list:
        for label, name in arm_table(r):
            arms.setdefault(label, name)
    ref = next((x for r in results_list if (x := reference(r))), None)

    model_names: list[str] = []
    for r in results_list:
        model_names += [n for n in r.get("models") or {} if n not in model_names]
    models: dict[str, dict] = {}
    for name in model_names:
        entries = [m for r in results_list if (m := (r.get("models") or {}).get(name))]
        entry: dict[str, Any] = {"arm": entries[0].get("arm"), "bpb": {}, "loss": {}}
        for key in ("bpb", "loss"):
            for d in doms:
                entry[key][d] = _stats([v for m in entries
                                        if (v := model_bpb(m, d, key)) is not None])
        entry["bpb_mean"] = _stats([v for m in entries
                                    if (v := complete_mean([model_bpb(m, d) for d in doms]))
                                    is not None])
        for key in ("train_flops", "tokens", "active_params", "total_params",
                    "tokens_by_domain", "epochs_by_domain"):
            entry[key] = entries[0].get(key)
        acc = {d: _stats(vals) for d in doms
               if (vals := [v for m in entries if (v := model_bpb(m, d, "route_accuracy"))
                            is not None])}  # fmt: skip
        if acc:  # a top-1 routed ensemble (c-BTM): its router's accuracy
            entry["route_accuracy"] = acc
        models[name] = entry

    gain: dict[str, dict[str, dict[str, Any]]] = {}
    pending: list[tuple[dict, list[float], list[list] | None]] = []  # cells to test
    if ref is not None:
        for label, name in arms.items():
            if label == ref[0]:
                continue
            row: dict[str, dict[str, Any]] = {}
            for d in [*doms, "mean"]:
                cols = doms if d == "mean" else [d]
                xs, ys, rels, wins = [], [], [], 0
                groups: list[list] | None = [[] for _ in cols]
                for r in results_list:
                    ms = r.get("models") or {}
                    a, b = ms.get(name), ms.get(ref[1])
                    if d == "mean":
                        x = complete_mean([model_bpb(a, e) for e in doms])
                        y = complete_mean([model_bpb(b, e) for e in doms])
                    else:
                        x, y = model_bpb(a, d), model_bpb(b, d)
                    if x is None or y is None:
                        continue
                    xs.append(x)
                    ys.append(y)
                    rels.append(100.0 * (x - y) / y if y else math.nan)
                    wins += x - y < -TIE
                    docs = [documents(a, b, e) for e in cols]
                    if groups is not None and all(docs):
                        for g, doc in zip(groups, docs):
                            g.append(doc)
                    else:
                        groups = None  # a seed without per-document scores: t over seeds
                row[d] = {"delta": _paired(xs, ys), "rel_pct": _stats(rels), "wins": wins}
                pending.append((row[d], [x - y for x, y in zip(xs, ys)], groups))
            gain[label] = row
    # the resamples must resolve p-values small enough to survive the correction
    tested = sum(len(diffs) > 1 for _, diffs, _ in pending)
    resamples = bootstrap_resamples(iters, tested * family, 1.0 - LEVEL)
    for cell, diffs, groups in pending:
        cell["test"] = gain_test(diffs, groups, resamples, LEVEL)
    comparisons = holm_verdicts([(gain, margin)], 1.0 - LEVEL)

    views = [v for r in results_list if (v := eval_sets_view(r)) is not None]
    return {
        # study.eval_data, the same tables (a table of its own: corrected on its own)
        "eval_sets": aggregate(views, margin=margin, iters=iters, family=family) if views
        else None,
        "eval_data": first.get("eval_data") or [],
        "name": first.get("name"),
        "seeds": [r.get("seed") for r in results_list],
        "n": len(results_list),
        "level": LEVEL,
        "alpha": 1.0 - LEVEL,
        "equivalence_margin": margin,
        "bootstrap_iters": iters,
        "comparisons": comparisons,  # the tests Holm-corrected together (the gains table)
        "domains": doms,
        "experts": first.get("experts"),
        "split_method": first.get("split_method"),
        "protocol": first.get("protocol"),
        "eval_protocol": first.get("eval_protocol"),
        "budget": first.get("budget"),
        "train_tokens_by_domain": first.get("train_tokens_by_domain"),
        "samples": first.get("samples"),
        "device": first.get("device"),
        "wall_s": [r.get("wall_s") for r in results_list],
        "command": first.get("command"),
        "arms": arms,
        "reference_arm": ref[0] if ref else None,
        "experts_arm": (lambda e: e[0] if e else None)(experts_arm(first)),
        "models": models,
        "gains": gain,
    }


def _ci(s: dict[str, Any], signed: bool = False) -> str:
    """A stats dict as "mean ± half" (or "mean (n=1, no CI)"); "-" with no values."""
    return format_mean_ci(s["mean"], s["half"], signed=signed) if s["n"] else "-"


def _bpb_table(agg: dict, arms: list[tuple[str, str]]) -> list[str]:
    """Per-arm bpb per domain (and mean), mean ± CI over seeds; best per column in bold."""
    doms, models = list(agg.get("domains") or []), agg.get("models") or {}
    lines: list[str] = []
    best: dict[str, float] = {}
    for d in [*doms, "mean"]:
        col = [s["mean"] for _, n in arms
               if (s := (models[n]["bpb"].get(d) if d != "mean" else models[n]["bpb_mean"]))
               and s["n"]]
        if col:
            best[d] = min(col)
    rows = []
    for label, name in arms:
        cells = []
        for d in [*doms, "mean"]:
            s = models[name]["bpb"][d] if d != "mean" else models[name]["bpb_mean"]
            cell = _ci(s)
            cells.append(bold(cell) if s["n"] and s["mean"] == best.get(d) else cell)
        ns = [models[name]["bpb"][d]["n"] for d in doms]
        n_cell = str(max(ns)) if min(ns) == max(ns) else f"{min(ns)}–{max(ns)}"
        rows.append([label, f"`{name}`", *cells, n_cell])
    lines.append(format_table(["arm", "model", *doms, "mean", "n"], rows,
                              ["l", "l"] + ["r"] * (len(doms) + 2)))
    lines.append("")
    return lines


def _gain_cell(g: dict) -> str:
    """One gains cell: the gain with its interval, the relative change, seeds where lower."""
    pct_cell = format_pct(g["rel_pct"]["mean"])
    if g["delta"]["half"] is None:
        return f"{format_delta(g['delta']['mean'])} ({pct_cell}; n=1, no CI)"
    return f"{interval_text(g.get('test'), g['delta'])} ({pct_cell}; {g['wins']}/{g['delta']['n']})"


def _verdict_cell(g: dict) -> str:
    """A verdict with its Holm-adjusted p-value: "wins (p=0.012)"."""
    if not g.get("verdict"):
        return "-"
    p = p_text(g.get("test"))
    return f"{g['verdict']} ({p})" if p else g["verdict"]


def _gains_tables(agg: dict, arms: list[tuple[str, str]]) -> list[str]:
    """Paired gains vs the reference per domain, and the verdict table, under their method."""
    doms, gains = list(agg.get("domains") or []), agg.get("gains") or {}
    ref, pct = agg.get("reference_arm"), f"{100 * agg.get('level', LEVEL):g}%"
    lines: list[str] = []
    if ref and gains:
        margin = agg.get("equivalence_margin", MARGIN)
        lines.append(method_text(gains, doms, agg.get("n", 0), agg.get("level", LEVEL), margin,
                                 agg.get("comparisons", 0), agg.get("bootstrap_iters", ITERS)))
        lines.append("")
        lines.append(f"Reference: {ref}. Cells: Δbpb = arm − reference paired per seed "
                     f"(negative = better), mean and {pct} interval; mean relative change; "
                     "seeds where the arm is lower.")
        lines.append("")
        rows, verdicts = [], []
        arm_model = dict(arms)
        for label, row in gains.items():
            cells = [_gain_cell(row[d]) if row[d]["delta"]["n"] else "-"
                     for d in [*doms, "mean"]]
            rows.append([label, f"`{arm_model.get(label, '-')}`", *cells])
            verdicts.append([label, *(_verdict_cell(row[d]) for d in [*doms, "mean"])])
        lines.append(format_table(["arm", "model", *doms, "mean"], rows,
                                  ["l", "l"] + ["r"] * (len(doms) + 1)))
        lines += ["", f"Verdicts (Holm-adjusted p in parentheses; \"tie\": the {pct} interval "
                  f"lies within ±{margin:g} bpb):", ""]
        lines.append(format_table(["arm", *doms, "mean"], verdicts,
                                  ["l"] + ["r"] * (len(doms) + 1)))
    else:
        lines.append("No compute-matched reference.")
    return lines


def render_aggregate_report(agg: dict, plot: bool = False) -> str:
    """The markdown of the N-seed report; `plot` says whether the bpb PNG exists."""
    doms = list(agg.get("domains") or [])
    models = agg.get("models") or {}
    arms = [(label, name) for label, name in (agg.get("arms") or {}).items() if name in models]
    if not arms:
        arms = [(n, n) for n in models]
    seeds = ", ".join(str(s) for s in agg.get("seeds") or [])
    walls = [w for w in agg.get("wall_s") or [] if is_num(w)]
    pct = f"{100 * agg.get('level', LEVEL):g}%"
    lines = [
        f"# moe-forge study report: {agg.get('name', 'run')} ({agg.get('n', 0)} seeds)",
        "",
        f"- seeds: {seeds}; device: {agg.get('device', '-')}; run time summed over seeds "
        f"{format_seconds(sum(walls)) if walls else '-'} (seeds run in parallel take less "
        "wall time)",
        f"- domains: {', '.join(doms) or '-'}; "
        f"experts: {', '.join(agg.get('experts') or []) or '-'}; "
        f"split method: {agg.get('split_method', '-')}",
        f"- every number is mean ± half-width of its {pct} confidence interval over seeds "
        "(Student t, n − 1 degrees of freedom); a value from a single seed reads "
        "\"n=1, no CI\"; gains over the reference are tested as their section says",
    ]
    if agg.get("n") == 1:
        lines.append("- one seed: no confidence intervals, so no difference below is tested")
    lines += ["", "## Answer", ""]
    ref, exp = agg.get("reference_arm"), agg.get("experts_arm")
    gains = agg.get("gains") or {}
    if ref and exp in gains:
        parts = [f"**{exp}** vs **{ref}**, Δbpb = experts − reference paired per seed, mean and "
                 f"{pct} interval (negative = better), verdicts Holm-corrected across the gains "
                 f"table, \"tie\" within ±{agg.get('equivalence_margin', MARGIN):g} bpb (the "
                 "method is stated above that table):"]
        for d in [*doms, "mean"]:
            g = gains[exp][d]
            n = g["delta"]["n"]
            where = "averaged over domains" if d == "mean" else f"on **{d}**"
            if not n:
                if d != "mean":
                    parts.append(f"{where}: no comparison;")
                continue
            pct_cell = format_pct(g["rel_pct"]["mean"])
            if g["delta"]["half"] is None:
                parts.append(f"{where}: {g['verdict']}, {format_delta(g['delta']['mean'])} bpb "
                             f"({pct_cell}; n=1, no CI);")
                continue
            parts.append(f"{where}: {g['verdict']}, {interval_text(g.get('test'), g['delta'])} "
                         f"bpb ({pct_cell}), lower in {g['wins']}/{n} seeds;")
        parts[-1] = parts[-1][:-1] + "."
        lines.append(" ".join(parts))
    else:
        lines.append("No comparison: the results hold no compute-matched reference or no "
                     "experts arm.")
    lines += ["", "## Per-domain bits per byte", ""]
    lines += _bpb_table(agg, arms)
    lines += routing_accuracy_lines(
        [(label, {d: st["mean"] for d, st in acc.items()}) for label, name in arms
         if (acc := models[name].get("route_accuracy"))])  # fmt: skip
    if plot:
        lines += [f"![bits per byte by domain]({PLOTS_DIR}/{BPB_PLOT})", ""]
    lines += ["## Gains vs the compute-matched monolithic model", ""]
    lines += _gains_tables(agg, arms)
    sets = agg.get("eval_sets")
    if sets:
        specs = ", ".join(f"`{x}`" for x in agg.get("eval_data") or []) or "-"
        lines += ["", "## Other held-out sets", "",
                  f"`study.eval_data`: {specs}. Every document of each set is evaluated; "
                  "the mean is over these sets.", ""]
        lines += _bpb_table(sets, [(lb, n) for lb, n in arms if n in sets["models"]])
        lines += _gains_tables(sets, [(lb, n) for lb, n in arms if n in sets["models"]])
    from moe.experiments.study.report.sections import _protocol_section

    protocol = _protocol_section(agg)
    if protocol:
        lines += ["", "## Protocol and data exposure", "",
                  "(compute and tokens are the same for every seed; shown for the first)", "",
                  protocol]
    if agg.get("samples"):
        lines += ["", agg["samples"].rstrip("\n").replace(
            "## Samples", "## Samples (first seed)", 1)]
    lines += ["", "## Reproduce", "", "```",
              command_line(agg) + (f"  # --seeds {agg.get('n')}" if not agg.get("command") else ""),
              "```", ""]
    return "\n".join(lines)


def write_aggregate_report(agg: dict, run_dir: Path) -> Path:
    """Write `run_dir/report.md` (+ `plots/bpb_by_domain.png` with error bars) for N seeds."""
    run_dir = Path(run_dir)
    plotted = plot_aggregate(agg, run_dir / PLOTS_DIR / BPB_PLOT)
    path = run_dir / "report.md"
    atomic_write_text(path, render_aggregate_report(agg, plot=plotted))
    return path
