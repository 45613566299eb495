"""The sweep report: each arm's gain over the compute-matched monolith against the swept value.

Input is `moe.experiments.study.sweep.summarize`'s dict (saved as the sweep's results.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe.experiments.study.report.format import (
    format_flops,
    format_mean_ci,
    format_num,
    format_table,
    is_num,
)
from moe.experiments.study.report.plots import PLOTS_DIR, _figure, _save
from moe.experiments.study.report.verdicts import interval_text
from moe.io.checkpoint import atomic_write_text

SWEEP_PLOT = "gain_vs_sweep.png"


def _cell(point: dict, label: str, domain: str) -> dict:
    return ((point.get("gains") or {}).get(label) or {}).get(domain) or {}


def _gain(point: dict, label: str, domain: str) -> tuple[Any, Any, Any]:
    """(mean gain, its error bar: a half-width or (below, above) the mean, verdict)."""
    g = _cell(point, label, domain)
    d, t = g.get("delta") or {}, g.get("test") or {}
    if t.get("method") == "bootstrap" and is_num(t.get("lo")) and is_num(t.get("hi")):
        return t["mean"], (t["mean"] - t["lo"], t["hi"] - t["mean"]), g.get("verdict")
    return d.get("mean"), d.get("half"), g.get("verdict")


def _x(summary: dict) -> tuple[list[float], str, bool]:
    """x values: the monolith's training FLOPs when known for every value and not constant (a
    compute sweep's natural axis, log scale), else the swept values themselves when numeric."""
    pts = summary["points"]
    flops = [p.get("monolith_flops") for p in pts]
    if all(is_num(f) and f > 0 for f in flops) and max(flops) / min(flops) >= 1.5:
        return [float(f) for f in flops], "training FLOPs of the compute-matched monolith", True
    try:
        xs = [float(v) for v in summary["values"]]
    except ValueError:
        return list(range(len(pts))), column(summary), False
    span = max(xs) / min(xs) if min(xs) > 0 else 0
    return xs, column(summary), span >= 8


def plot_sweep(summary: dict, path: Path) -> bool:
    doms = [*summary["domains"], "mean"]
    labels = summary["arms"]
    if not labels:
        return False
    xs, xlabel, logx = _x(summary)
    fig = _figure(3.2 * len(doms) + 1.0, 3.8)
    axes = fig.subplots(1, len(doms), sharey=False)
    for ax, d in zip(axes, doms):
        for label in labels:
            ys, below, above, px = [], [], [], []
            for x, p in zip(xs, summary["points"]):
                m, h, _ = _gain(p, label, d)
                if is_num(m):
                    px.append(x)
                    ys.append(m)
                    lo, hi = h if isinstance(h, tuple) else (h, h)
                    below.append(max(lo, 0.0) if is_num(lo) else 0.0)
                    above.append(max(hi, 0.0) if is_num(hi) else 0.0)
            if px:
                ax.errorbar(px, ys, yerr=[below, above], marker="o", capsize=3, label=label)
        ax.axhline(0.0, color="black", linewidth=0.8)
        if logx:
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide at 16x
        ax.set_title(d)
        ax.set_xlabel(xlabel, fontsize=8)
    axes[0].set_ylabel("Δ bpb vs monolith (negative: arm better)")
    axes[-1].legend(fontsize=7, loc="best")
    _save(fig, path)
    return True


def column(summary: dict) -> str:
    """The swept values' column heading: the key, or "value" when each value sets several keys
    of the recipe (key ".")."""
    return "value" if summary["key"] == "." else summary["key"]


def _title(summary: dict) -> str:
    if summary["key"] != ".":
        return summary["key"]
    first = (summary.get("settings") or summary["values"])[0]
    return ", ".join(part.partition("=")[0] for part in first.split(", "))


def _shown_values(summary: dict) -> list[str]:
    """Each value as the report names it, with the settings it stands for when labelled."""
    settings = summary.get("settings") or summary["values"]
    return [v if v == s else f"{v} ({s})" for v, s in zip(summary["values"], settings)]


def render_sweep_report(summary: dict, plot: bool = False) -> str:
    key, doms = column(summary), summary["domains"]
    n = summary["points"][0].get("n") or 1
    ref = summary.get("reference_arm") or "the reference"
    level = int(round(100 * summary.get("level", 0.95)))
    lines = [f"# moe-forge sweep report: {_title(summary)}", "",
             f"- swept: `{summary['key']}` over {'; '.join(_shown_values(summary))}; {n} seed(s) "
             "per value",
             f"- reference: {ref}; every cell is arm − reference in bits per byte, paired by "
             f"seed, mean and {level}% interval (\"[lo, hi]\": hierarchical bootstrap over "
             "seeds and held-out documents; \"± half-width\": Student t over seeds, where the "
             "results hold no per-document scores); negative means the arm is better"]
    if "comparisons" in summary:
        margin = summary.get("equivalence_margin", 0.01)
        lines.append(f"- verdicts: Holm-corrected across all {summary['comparisons']} "
                     "comparisons of this sweep (every value, arm and domain, the mean "
                     f"included), α = {1 - summary.get('level', 0.95):.2g}; \"tie\": the "
                     f"interval lies within ±{margin:g} bpb (the equivalence margin); crossovers "
                     "are called distinguishable on these verdicts")
    else:
        lines.append("- verdicts: each value's own, uncorrected (results written before the "
                     "sweep's Holm correction)")
    lines.append("")
    lines += ["## Crossovers", ""]
    for label in summary["arms"]:
        cross = summary["crossovers"].get(label) or {}
        parts = [f"{d}: {(cross.get(d) or {}).get('summary', '-')}" for d in [*doms, "mean"]]
        lines.append(f"- **{label}**: " + "; ".join(parts))
    lines.append("")
    lines += _reference_section(summary)
    if plot:
        lines += [f"![gain vs {key}]({PLOTS_DIR}/{SWEEP_PLOT})", ""]
    for d in [*doms, "mean"]:
        lines += [f"## {d}", ""]
        rows = []
        for p in summary["points"]:
            row = [p["value"], format_flops(p.get("monolith_flops"))]
            for label in summary["arms"]:
                g = _cell(p, label, d)
                text = (interval_text(g.get("test"), g["delta"]) if g.get("delta")
                        else format_mean_ci(None, None))
                row.append(text + (f" ({g['verdict']})" if g.get("verdict") else ""))
            rows.append(row)
        lines.append(format_table([key, "monolith FLOPs", *summary["arms"]], rows,
                                  ["l", "r"] + ["r"] * len(summary["arms"])))
        lines.append("")
    lines += ["## Epochs over each domain's training data", "",
              "How many times each arm's lineage read its domains' training splits (the first "
              "seed's; every seed reads as much): repetition beyond a few epochs adds little "
              "(Muennighoff et al. 2023).", ""]
    rows = []
    for p in summary["points"]:
        for label, ep in (p.get("epochs") or {}).items():
            if ep:
                rows.append([p["value"], label, *[format_num(ep.get(d), 2) for d in doms]])
    if rows:
        lines.append(format_table([key, "arm", *doms], rows, ["l", "l"] + ["r"] * len(doms)))
        lines.append("")
    lines += ["## Reproduce", "", "```", summary.get("command", "moe sweep <recipe>"), "```", ""]
    return "\n".join(lines)


def _reference_section(summary: dict) -> list[str]:
    """The reference arm's own loss at each value, its size and tokens per parameter: at fixed
    FLOPs over model sizes, the row with the lowest mean is the compute-optimal size."""
    from moe.experiments.study.sweep import best_value

    pts = summary["points"]
    if not any(p.get("reference") for p in pts):
        return []
    doms = [*summary["domains"], "mean"]
    best = best_value(pts)
    rows = []
    for i, p in enumerate(pts):
        ref = p.get("reference") or {}
        bpb = ref.get("bpb") or {}
        cells = [format_mean_ci((bpb.get(d) or {}).get("mean"), (bpb.get(d) or {}).get("half"))
                 for d in doms]
        if i == best:
            cells[-1] = f"**{cells[-1]}**"
        ep = ref.get("epochs") or {}
        rows.append([p["value"], format_num(ref.get("total_params"), 0),
                     format_num(ref.get("tokens_per_param"), 1),
                     format_num(max(ep.values()) if ep else None, 2),
                     format_flops(p.get("monolith_flops")), *cells])
    ref_name = summary.get("reference_arm") or "the reference"
    out = ["## The reference itself", "",
           f"The {ref_name} at each value: its parameters, training tokens per parameter, the "
           "most epochs it read of any domain, its training FLOPs, and its bits per byte (mean "
           "± 95% t half-width over seeds). The lowest mean is in bold: over model sizes at "
           "fixed FLOPs, that is the compute-optimal size.", ""]
    out.append(format_table(
        [column(summary), "parameters", "tokens/param", "max epochs", "FLOPs", *doms], rows,
        ["l", "r", "r", "r", "r"] + ["r"] * len(doms)))
    out.append("")
    return out


def write_sweep_report(summary: dict, run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    ok = plot_sweep(summary, run_dir / PLOTS_DIR / SWEEP_PLOT)
    path = run_dir / "report.md"
    atomic_write_text(path, render_sweep_report(summary, plot=ok))
    return path
