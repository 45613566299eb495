"""The report's PNG plots (matplotlib, headless: a bare Agg figure, no pyplot state)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from moe.experiments.study.report.format import format_delta, format_num, is_num
from moe.experiments.study.report.results import (
    arm_table,
    branches,
    complete_mean,
    domains,
    model_bpb,
    reference,
    seed_model,
    specialization_matrix,
)

PLOTS_DIR = "plots"
BPB_PLOT = "bpb_by_domain.png"
CURVES_PLOT = "loss_vs_flops.png"
SPECIALIZATION_PLOT = "specialization.png"


def _save(fig: Any, path: Path) -> None:
    """Render through a temporary name so a reader never sees a half-written PNG."""
    from moe.io.checkpoint import staged_file

    with staged_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def _figure(width: float, height: float) -> Any:
    # An Agg canvas attached to a bare Figure renders headless without pyplot's global state, so
    # the process-wide backend of whoever called us (a notebook, say) stays untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _grouped_bars(path: Path, groups: list[str], series: list[tuple[str, list[float | None],
                  list[float | None] | None]], title: str, ref_label: str | None) -> None:
    """Bars: groups on x, one bar per series, optional error bars, value on top of each bar."""
    fig = _figure(max(6.0, 1.1 * len(groups) * max(1, len(series)) * 0.45 + 2), 4.2)
    ax = fig.add_subplot()
    n = max(1, len(series))
    width = 0.8 / n
    vals = [v for _, ys, _ in series for v in ys if v is not None]
    for i, (label, ys, errs) in enumerate(series):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        hs = [y if y is not None else math.nan for y in ys]
        yerr = [e if e is not None else 0.0 for e in errs] if errs else None
        bars = ax.bar(xs, hs, width, label=label, yerr=yerr, capsize=3 if yerr else 0,
                      hatch="//" if label == ref_label else None, edgecolor="black",
                      linewidth=0.4)
        ax.bar_label(bars, labels=[format_num(y, 2) for y in ys], fontsize=6, rotation=90,
                     padding=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("bits per byte (lower is better)")
    if vals:
        # differences between arms are small next to the bpb itself: start the axis near the
        # smallest bar so they are visible (the numbers are printed on the bars)
        lo, hi = min(vals), max(vals)
        span = max(hi - lo, 0.05 * hi, 1e-6)
        ax.set_ylim(max(0.0, lo - 0.6 * span), hi + 0.45 * span)
        title += " (y axis truncated)" if lo - 0.6 * span > 0 else ""
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save(fig, path)


def plot_bpb(results: dict, path: Path) -> bool:
    """Bars of bpb per arm and domain (and their mean); False (nothing written) without any."""
    models, doms = results["models"], domains(results)
    arms = arm_table(results)
    if not arms or not doms:
        return False
    ref = reference(results)
    series = []
    for label, name in arms:
        ys = [model_bpb(models[name], d) for d in doms]
        series.append((label, [*ys, complete_mean(ys)], None))
    _grouped_bars(path, [*doms, "mean"], series, "Held-out bits per byte",
                  ref[0] if ref else None)
    return True


def plot_curves(results: dict, path: Path) -> bool:
    """Held-out loss against cumulative training FLOPs per curve; False without curves."""
    curves = {k: v for k, v in (results.get("curves") or {}).items() if v}
    doms = domains(results)
    if not curves or not doms:
        return False
    fig = _figure(3.2 * (len(doms) + 1) + 1.5, 3.6)
    axes = fig.subplots(1, len(doms) + 1, sharex=True)
    colors = [f"C{i}" for i in range(len(curves))]
    for (label, points), color in zip(curves.items(), colors):
        pts = sorted((p for p in points if is_num(p.get("flops")) and p["flops"] > 0),
                     key=lambda p: p["flops"])
        for ax, d in zip(axes[1:], doms):
            xy = [(p["flops"], (p.get("loss") or {}).get(d)) for p in pts]
            xy = [(x, y) for x, y in xy if is_num(y)]
            if xy:
                ax.plot(*zip(*xy), marker=".", color=color, linewidth=1, label=label)
        mean = [(p["flops"], complete_mean([(p.get("loss") or {}).get(d) for d in doms]))
                for p in pts]
        mean = [(x, y) for x, y in mean if y is not None]
        if mean:
            axes[0].plot(*zip(*mean), marker="o", color=color, linewidth=2, label=label)
    for ax, title in zip(axes, ["mean over domains", *doms]):
        ax.set_xscale("log")
        ax.set_title(title)
        ax.set_xlabel("training FLOPs")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("held-out loss (nats/token)")
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="outside right upper")
    _save(fig, path)
    return True


def plot_specialization(results: dict, path: Path) -> bool:
    """The seed and branch × domain bpb matrix, coloured by Δ vs the seed; False without
    branches."""
    doms = domains(results)
    names, owns, bpb, delta = specialization_matrix(results)
    if not branches(results) or not doms:
        return False
    seed_name = seed_model(results)
    fig = _figure(1.6 * len(doms) + 3.0, 0.55 * len(names) + 1.8)
    ax = fig.add_subplot()
    # colour = Δ vs the seed (the comparison the matrix is about), symmetric around 0
    grid = [[d if d is not None else math.nan for d in row] for row in delta]
    finite = [abs(x) for row in grid for x in row if not math.isnan(x)]
    lim = max(finite, default=1.0) or 1.0
    im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    for i, name in enumerate(names):
        for j, d in enumerate(doms):
            b = bpb[i][j]
            text = format_num(b)
            if name != seed_name:
                text += f"\n({format_delta(delta[i][j])})"
            weight = "bold" if d == owns[i] else "normal"
            dark = abs(grid[i][j]) > 0.6 * lim  # NaN compares False: missing cells stay black
            ax.text(j, i, text, ha="center", va="center", fontsize=8, fontweight=weight,
                    color="white" if dark else "black")
    ax.set_xticks(range(len(doms)), doms)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("evaluated on")
    ax.set_title("bpb per domain (Δ vs seed; blue = better)")
    fig.colorbar(im, ax=ax, label="Δ bpb vs seed")
    _save(fig, path)
    return True


def plot_aggregate(agg: dict, path: Path) -> bool:
    """Bars of mean bpb per arm and domain over seeds, error bars = the CI half-widths."""
    doms = list(agg.get("domains") or [])
    models = agg.get("models") or {}
    arms = [(label, name) for label, name in (agg.get("arms") or {}).items() if name in models]
    if not arms or not doms:
        return False
    series = []
    for label, name in arms:
        stats = [*(models[name]["bpb"][d] for d in doms), models[name]["bpb_mean"]]
        series.append((label, [s["mean"] for s in stats],
                       [s["half"] if is_num(s.get("half")) else None for s in stats]))
    n = agg.get("n")
    what = (f"mean ± {100 * agg.get('level', 0.95):g}% CI over {n} seeds" if n != 1
            else "one seed, no CI")
    _grouped_bars(path, [*doms, "mean"], series, f"Held-out bits per byte, {what}",
                  agg.get("reference_arm"))
    return True
