"""The study report: `report.md` plus PNG plots, from one `results.json` or several seeds of it.

Input is the results dict the study runner (`moe/study.py`) writes; every optional part of it
(`arms`, `curves`, `merge`, routing, per-domain evals) may be missing, and the matching section
then says so instead of failing. Numbers are formatted by the `format_*` helpers so the tests can
parse the tables back.

Conventions: bits per byte with 3 decimals; differences are "this arm minus the reference", so a
negative Δbpb is better; negative signs are the typographic minus (U+2212).
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from moe.io.checkpoint import atomic_write_text

MINUS = "\u2212"
_TIE = 1e-9  # bpb differences below this are float noise: no arm "beats" another by them
PLOTS_DIR = "plots"
BPB_PLOT = "bpb_by_domain.png"
CURVES_PLOT = "loss_vs_flops.png"
SPECIALIZATION_PLOT = "specialization.png"


# --------------------------------------------------------------------------- formatting helpers


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def format_num(x: Any, digits: int = 3) -> str:
    """A fixed-point number, or "-" when missing / not finite."""
    return f"{x:.{digits}f}".replace("-", MINUS) if _is_num(x) else "-"


def format_delta(x: Any, digits: int = 3) -> str:
    """A signed difference: "+0.050", "−0.312"; a tiny loss keeps its sign ("−0.000")."""
    if not _is_num(x):
        return "-"
    if abs(x) < _TIE:
        x = 0.0  # float noise from subtracting equal numbers must not read as a gain
    return f"{x:+.{digits}f}".replace("-", MINUS)


def format_pct(x: Any, digits: int = 1) -> str:
    """A signed percentage: "−4.4%"."""
    return format_delta(x, digits) + "%" if _is_num(x) else "-"


def format_flops(x: Any) -> str:
    """Scientific notation without the exponent's sign clutter: 1.23e12 (0 stays "0")."""
    if not _is_num(x):
        return "-"
    if x == 0:
        return "0"
    mant, exp = f"{x:.2e}".split("e")
    return f"{mant}e{int(exp)}".replace("-", MINUS)


def format_count(x: Any) -> str:
    """An integer count with thousands separators: 812,345."""
    return f"{int(x):,}" if _is_num(x) else "-"


def format_seconds(x: Any) -> str:
    """Wall time: seconds below 2 minutes, otherwise "8m 32s" / "1h 05m"."""
    if not _is_num(x):
        return "-"
    if x < 120:
        return f"{x:.1f} s"
    m, s = divmod(int(round(x)), 60)
    if m < 60:
        return f"{m}m {s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m"


def format_mean_std(mean: Any, std: Any, digits: int = 3, signed: bool = False) -> str:
    """ "2.104 ± 0.012"; the std reads "-" with a single seed."""
    fmt = format_delta if signed else format_num
    if not _is_num(mean):
        return "-"
    return f"{fmt(mean, digits)} ± {format_num(std, digits)}"


def bold(s: str) -> str:
    return f"**{s}**" if s != "-" else s


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]],
                 align: Sequence[str] | None = None) -> str:
    """A GitHub markdown table; align is one of "l"/"r" per column (default: first left)."""
    headers = list(headers)
    if align is None:
        align = ["l"] + ["r"] * (len(headers) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- reading results


def _bpb(model: dict | None, domain: str, key: str = "bpb") -> float | None:
    if not model:
        return None
    v = ((model.get("eval") or {}).get(domain) or {}).get(key)
    return float(v) if _is_num(v) else None


def _mean(xs: Sequence[float | None]) -> float | None:
    """Mean over domains, only when every domain has a value: a partial mean is not comparable."""
    if not xs or any(x is None for x in xs):
        return None
    return sum(xs) / len(xs)  # type: ignore[arg-type]


def arm_table(results: dict) -> list[tuple[str, str]]:
    """(label, model name) of the arms to compare, in the study's order.

    Without an `arms` mapping every evaluated model is its own arm; arms whose model was not
    evaluated are dropped.
    """
    models = results.get("models") or {}
    arms = results.get("arms")
    if not arms:
        return [(name, name) for name in models]
    return [(label, name) for label, name in arms.items() if name in models]


def reference(results: dict) -> tuple[str, str] | None:
    """(label, model) of the compute-matched monolithic reference, or None."""
    models = results.get("models") or {}
    arms = dict(arm_table(results))
    ref = results.get("reference_arm")
    if ref in arms:
        return ref, arms[ref]
    for label, name in arm_table(results):
        if models[name].get("arm") == "compute_matched":
            return label, name
    return None


def experts_arm(results: dict) -> tuple[str, str] | None:
    """(label, model) of the experts arm: the first arm whose model is an MoE.

    Without one among the arms, the model "moe" (router fine-tuned) is preferred over "btx",
    then the last MoE model evaluated.
    """
    models = results.get("models") or {}
    if results.get("arms"):
        for label, name in arm_table(results):
            if models[name].get("arm") == "moe":
                return label, name
    if "moe" in models:
        return "moe", "moe"
    moes = [n for n, m in models.items() if m.get("arm") == "moe"]
    return (moes[-1], moes[-1]) if moes else None


def _seed_model(results: dict) -> str | None:
    models = results.get("models") or {}
    if "seed" in models:
        return "seed"
    return next((n for n, m in models.items() if m.get("arm") == "seed"), None)


def branches(results: dict) -> list[tuple[str, str]]:
    """(model name, its domain) of every branch, ordered like `experts` (then the rest)."""
    models = results.get("models") or {}
    found = []
    for name, m in models.items():
        if m.get("arm") == "branch" or (m.get("arm") is None and name.startswith("branch-")):
            dom = m.get("domain") or name.removeprefix("branch-")
            found.append((name, dom))
    order = list(results.get("experts") or []) + list(results.get("domains") or [])
    found.sort(key=lambda nd: order.index(nd[1]) if nd[1] in order else len(order))
    return found


def _domains(results: dict) -> list[str]:
    doms = results.get("domains")
    if doms:
        return list(doms)
    seen: list[str] = []
    for m in (results.get("models") or {}).values():
        for d in m.get("eval") or {}:
            if d not in seen:
                seen.append(d)
    return seen


def forgetting(results: dict) -> list[dict]:
    """Every (branch, other domain) pair with bpb and Δ vs the seed, worst (largest Δ) first."""
    models = results.get("models") or {}
    seed = models.get(_seed_model(results) or "")
    rows = []
    for name, dom in branches(results):
        for d in _domains(results):
            if d == dom:
                continue
            b, s = _bpb(models[name], d), _bpb(seed, d)
            if b is None or s is None:
                continue
            rows.append({"branch": name, "domain": d, "bpb": b, "seed": s, "delta": b - s,
                         "rel_pct": 100.0 * (b - s) / s if s else None})
    rows.sort(key=lambda r: -r["delta"])
    return rows


# --------------------------------------------------------------------------- report sections


def _answer(results: dict) -> str:
    models = results["models"]
    ref, exp = reference(results), experts_arm(results)
    parts: list[str] = []
    if ref is None or exp is None:
        missing = "compute-matched monolithic model" if ref is None else "experts (MoE) model"
        parts.append(f"No comparison: the results hold no {missing}.")
    else:
        parts.append(f"Experts arm `{exp[1]}` against the compute-matched monolithic model "
                     f"`{ref[1]}`, per domain (bits per byte, lower is better):")
        for d in _domains(results):
            e, r = _bpb(models[exp[1]], d), _bpb(models[ref[1]], d)
            if e is None or r is None:
                side = exp[1] if e is None else ref[1]
                parts.append(f"on **{d}** there is no comparison (`{side}` has no bpb).")
                continue
            delta = e - r
            rel = 100.0 * delta / r if r else float("nan")
            verdict = "beats" if delta < -_TIE else "does not beat"
            parts.append(f"on **{d}** it {verdict} it, {format_num(e)} vs {format_num(r)} "
                         f"({format_delta(delta)} bpb, {format_pct(rel)});")
        em = _mean([_bpb(models[exp[1]], d) for d in _domains(results)])
        rm = _mean([_bpb(models[ref[1]], d) for d in _domains(results)])
        if em is not None and rm is not None:
            parts.append(f"averaged over domains {format_num(em)} vs {format_num(rm)} "
                         f"({format_delta(em - rm)} bpb).")
        elif parts[-1].endswith(";"):
            parts[-1] = parts[-1][:-1] + "."
    forg = forgetting(results)
    if forg:
        w = forg[0]
        if w["delta"] > 0:
            parts.append(f"Out-of-domain cost: the worst forgetting is `{w['branch']}` on "
                         f"{w['domain']}, {format_num(w['seed'])} → {format_num(w['bpb'])} "
                         f"({format_delta(w['delta'])} bpb, {format_pct(w['rel_pct'])} vs the "
                         "seed).")
        else:
            parts.append("Out-of-domain cost: no branch got worse than the seed on another "
                         f"domain (least improvement: `{w['branch']}` on {w['domain']}, "
                         f"{format_delta(w['delta'])} bpb).")
    elif branches(results):
        parts.append("Out-of-domain cost: not measurable (no seed model or no cross-domain "
                     "evals).")
    return " ".join(parts)


def _bpb_section(results: dict) -> str:
    models, doms = results["models"], _domains(results)
    arms = arm_table(results)
    if not arms:
        return "No evaluated models."
    values = [[_bpb(models[name], d) for d in doms] for _, name in arms]
    values = [v + [_mean(v)] for v in values]
    best = []
    for j in range(len(doms) + 1):
        col = [v[j] for v in values if v[j] is not None]
        best.append(min(col) if col else None)
    rows = []
    for (label, name), vals in zip(arms, values):
        cells = [bold(format_num(x)) if x is not None and x == best[j] else format_num(x)
                 for j, x in enumerate(vals)]
        rows.append([label, f"`{name}`", *cells])
    return format_table(["arm", "model", *doms, "mean"], rows, ["l", "l"] + ["r"] * (len(doms) + 1))


def gains(results: dict) -> dict[str, dict[str, dict[str, float | None]]]:
    """label -> domain (and "mean") -> {"delta", "rel_pct"} against the reference arm."""
    ref = reference(results)
    if ref is None:
        return {}
    models, doms = results["models"], _domains(results)
    rvals = [_bpb(models[ref[1]], d) for d in doms]
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for label, name in arm_table(results):
        if label == ref[0]:
            continue
        avals = [_bpb(models[name], d) for d in doms]
        row = {}
        for d, a, r in zip([*doms, "mean"], [*avals, _mean(avals)], [*rvals, _mean(rvals)]):
            if a is None or r is None:
                row[d] = {"delta": None, "rel_pct": None}
            else:
                row[d] = {"delta": a - r, "rel_pct": 100.0 * (a - r) / r if r else None}
        out[label] = row
    return out


def _gains_section(results: dict) -> str:
    ref = reference(results)
    if ref is None:
        return "No compute-matched monolithic model in the results: nothing to compare against."
    doms = _domains(results)
    arms = dict(arm_table(results))
    rows = []
    for label, row in gains(results).items():
        cells = [f"{format_delta(row[d]['delta'])} ({format_pct(row[d]['rel_pct'])})"
                 for d in [*doms, "mean"]]
        rows.append([label, f"`{arms[label]}`", *cells])
    head = (f"Reference: {ref[0]} (`{ref[1]}`). Cells: Δbpb = arm − reference "
            "(negative = better), relative change in parentheses.\n\n")
    if not rows:
        return head + "No other arms."
    return head + format_table(["arm", "model", *doms, "mean"], rows,
                               ["l", "l"] + ["r"] * (len(doms) + 1))


def _ledger_section(results: dict) -> str:
    out = []
    stages = results.get("stages") or []
    if stages:
        rows = []
        for s in stages:
            rows.append([s.get("name", "-"), s.get("kind", "-"), format_count(s.get("steps")),
                         format_count(s.get("tokens")), format_flops(s.get("flops")),
                         format_count(s.get("active_params")), format_count(s.get("total_params")),
                         format_num(s.get("wall_s"), 1)])

        def total(key: str) -> float:
            return sum(s[key] for s in stages if _is_num(s.get(key)))

        rows.append(["**total**", "", format_count(total("steps")), format_count(total("tokens")),
                     format_flops(total("flops")), "", "", format_num(total("wall_s"), 1)])
        out.append(format_table(
            ["stage", "kind", "steps", "tokens", "FLOPs", "active params", "total params",
             "wall s"], rows, ["l", "l"] + ["r"] * 6))
    else:
        out.append("No stages recorded.")
    models = results["models"]
    ref = reference(results)
    ref_flops = models[ref[1]].get("train_flops") if ref else None
    rows = []
    for label, name in arm_table(results):
        m = models[name]
        f = m.get("train_flops")
        ratio = f"×{f / ref_flops:.2f}" if _is_num(f) and _is_num(ref_flops) and ref_flops else "-"
        rows.append([label, f"`{name}`", format_flops(f), ratio, format_count(m.get("tokens")),
                     format_count(m.get("active_params")), format_count(m.get("total_params"))])
    if rows:
        out.append("Per-arm totals (training FLOPs of everything the model descends from; "
                   "ratio vs the reference):")
        out.append(format_table(["arm", "model", "train FLOPs", "vs ref", "tokens",
                                 "active params", "total params"], rows,
                                ["l", "l"] + ["r"] * 5))
    return "\n\n".join(out)


def specialization_matrix(results: dict) -> tuple[list[str], list[str], list[list[float | None]],
                                                  list[list[float | None]]]:
    """(row models, own domain per row or "", bpb[row][domain], Δ vs seed[row][domain])."""
    models, doms = results["models"], _domains(results)
    seed_name = _seed_model(results)
    seed = models.get(seed_name or "")
    rows = ([(seed_name, "")] if seed_name else []) + branches(results)
    names = [n for n, _ in rows]
    owns = [d for _, d in rows]
    bpb = [[_bpb(models[n], d) for d in doms] for n in names]
    delta = [[(b - s) if b is not None and (s := _bpb(seed, d)) is not None else None
              for b, d in zip(row, doms)] for row in bpb]
    return names, owns, bpb, delta


def _specialization_section(results: dict) -> str:
    doms = _domains(results)
    names, owns, bpb, delta = specialization_matrix(results)
    if not branches(results):
        return "No branch models in the results."
    seed_name = _seed_model(results)
    rows = []
    for name, own, bs, ds in zip(names, owns, bpb, delta):
        cells = []
        for d, b, dd in zip(doms, bs, ds):
            cell = format_num(b) if name == seed_name else f"{format_num(b)} ({format_delta(dd)})"
            cells.append(bold(cell) if d == own and b is not None else cell)
        rows.append([f"`{name}`", own or "-", *cells])
    note = ("Cells: bpb, with Δ vs the seed in parentheses (negative = better); the branch's own "
            "domain in bold." if seed_name else "No seed model: Δ not available.")
    return note + "\n\n" + format_table(["model", "trained on", *doms], rows,
                                        ["l", "l"] + ["r"] * len(doms))


def _merge_section(results: dict) -> str | None:
    merge = results.get("merge")
    models, doms = results["models"], _domains(results)
    if not merge or merge.get("output") not in models:
        return None
    family = merge.get("domain") or merge.get("family")
    inputs = [n for n in merge.get("inputs") or [] if n in models]
    rows = []
    start = f"branch-{family}"
    if start in models:
        rows.append([f"`{start}` (start)", *[format_num(_bpb(models[start], d)) for d in doms]])
    for n in inputs:
        rows.append([f"`{n}`", *[format_num(_bpb(models[n], d)) for d in doms]])
    ft_mean = []
    for d in doms:
        vals = [_bpb(models[n], d) for n in inputs]
        ft_mean.append(_mean(vals) if vals else None)
    best_ft = [min((v for n in inputs if (v := _bpb(models[n], d)) is not None), default=None)
               for d in doms]
    out = merge["output"]
    merged = [_bpb(models[out], d) for d in doms]
    rows.append(["mean of fine-tunes", *[format_num(x) for x in ft_mean]])
    rows.append([f"**`{out}`** ({merge.get('method', '?')})", *[format_num(x) for x in merged]])
    rows.append(["merged − mean of fine-tunes",
                 *[format_delta(m - f) if m is not None and f is not None else "-"
                   for m, f in zip(merged, ft_mean)]])
    rows.append(["merged − best fine-tune",
                 *[format_delta(m - b) if m is not None and b is not None else "-"
                   for m, b in zip(merged, best_ft)]])
    head = (f"Family **{family}**: {len(inputs)} fine-tunes merged with "
            f"`{merge.get('method', '?')}` into `{out}`. Columns: bpb per domain "
            f"({family} is the family's own domain).\n\n")
    return head + format_table(["model", *doms], rows, ["l"] + ["r"] * len(doms))


def _routing_model(results: dict) -> str | None:
    models = results["models"]
    exp = experts_arm(results)
    if exp and (models[exp[1]].get("routing") or {}).get("share"):
        return exp[1]
    return next((n for n, m in models.items() if (m.get("routing") or {}).get("share")), None)


def _routing_section(results: dict) -> str | None:
    name = _routing_model(results)
    if name is None:
        return None
    routing = results["models"][name]["routing"]
    share: dict[str, list[list[float]]] = routing["share"]
    experts = list(routing.get("experts") or [])
    if not experts:
        first = next(iter(share.values()), [[]])
        experts = [str(i) for i in range(len(first[0]) if first else 0)]
    doms = [d for d in _domains(results) if d in share] + [d for d in share
                                                            if d not in _domains(results)]
    rows = []
    for d in doms:
        layers = share[d]
        avg = [sum(layer[i] for layer in layers) / len(layers) if layers else None
               for i in range(len(experts))]
        cells = [format_num(100 * a, 1) + "%" if a is not None else "-" for a in avg]
        cells = [bold(c) if e == d else c for c, e in zip(cells, experts)]
        rows.append([d, *cells])
    out = [f"Model `{name}`. Share of each domain's tokens routed to each expert, averaged over "
           "layers (the expert named after the domain in bold):",
           format_table(["domain", *experts], rows)]
    n_layers = max((len(share[d]) for d in doms), default=0)
    detail = []
    for li in range(n_layers):
        cells = []
        for d in doms:
            layer = share[d][li] if li < len(share[d]) else None
            cells.append("/".join(f"{100 * x:.0f}" for x in layer) if layer else "-")
        detail.append([str(li), *cells])
    out.append(f"Per layer (% to {' / '.join(experts)}):")
    out.append(format_table(["layer", *doms], detail))
    dead = routing.get("dead_experts") or []
    if dead:
        out.append("Dead experts (under 1% of every domain's tokens): " + ", ".join(
            f"layer {x.get('layer', '?')} `{x.get('expert', '?')}`" for x in dead) + ".")
    else:
        out.append("Dead experts: none.")
    return "\n\n".join(out)


def _command(results: dict) -> str:
    cmd = results.get("command")
    if cmd:
        return cmd if isinstance(cmd, str) else " ".join(str(c) for c in cmd)
    return "moe run <recipe>"


# --------------------------------------------------------------------------- plots


def _save(fig: Any, path: Path) -> None:
    """Render through a temporary name so a reader never sees a half-written PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
    models, doms = results["models"], _domains(results)
    arms = arm_table(results)
    if not arms or not doms:
        return False
    ref = reference(results)
    series = []
    for label, name in arms:
        ys = [_bpb(models[name], d) for d in doms]
        series.append((label, [*ys, _mean(ys)], None))
    _grouped_bars(path, [*doms, "mean"], series, "Held-out bits per byte",
                  ref[0] if ref else None)
    return True


def plot_curves(results: dict, path: Path) -> bool:
    curves = {k: v for k, v in (results.get("curves") or {}).items() if v}
    doms = _domains(results)
    if not curves or not doms:
        return False
    fig = _figure(3.2 * (len(doms) + 1) + 1.5, 3.6)
    axes = fig.subplots(1, len(doms) + 1, sharex=True)
    colors = [f"C{i}" for i in range(len(curves))]
    for (label, points), color in zip(curves.items(), colors):
        pts = sorted((p for p in points if _is_num(p.get("flops")) and p["flops"] > 0),
                     key=lambda p: p["flops"])
        for ax, d in zip(axes[1:], doms):
            xy = [(p["flops"], (p.get("loss") or {}).get(d)) for p in pts]
            xy = [(x, y) for x, y in xy if _is_num(y)]
            if xy:
                ax.plot(*zip(*xy), marker=".", color=color, linewidth=1, label=label)
        mean = [(p["flops"], _mean([(p.get("loss") or {}).get(d) for d in doms])) for p in pts]
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
    doms = _domains(results)
    names, owns, bpb, delta = specialization_matrix(results)
    if not branches(results) or not doms:
        return False
    seed_name = _seed_model(results)
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


# --------------------------------------------------------------------------- single run


def render_report(results: dict, plots: dict[str, bool] | None = None) -> str:
    """The report markdown; `plots` says which PNGs exist (by file name), so no link dangles."""
    plots = plots or {}
    results = {**results, "models": results.get("models") or {}}
    name = results.get("name", "run")
    experts = ", ".join(results.get("experts") or []) or "-"
    lines = [
        f"# moe-forge study report: {name}",
        "",
        f"- run: `{name}`, seed {results.get('seed', '-')}, created {results.get('created', '-')}",
        f"- device: {results.get('device', '-')}; "
        f"wall time {format_seconds(results.get('wall_s'))}",
        f"- domains: {', '.join(_domains(results)) or '-'}; experts: {experts}; "
        f"split method: {results.get('split_method', '-')}",
        "",
        "## Answer",
        "",
        _answer(results),
        "",
        "## Per-domain bits per byte",
        "",
        "Held-out bits per byte (lower is better); best per column in bold; mean over domains only "
        "where every domain was evaluated.",
        "",
        _bpb_section(results),
        "",
    ]
    if plots.get(BPB_PLOT):
        lines += [f"![bits per byte by domain]({PLOTS_DIR}/{BPB_PLOT})", ""]
    lines += ["## Gains vs the compute-matched monolithic model", "", _gains_section(results), "",
              "## Compute ledger", "", _ledger_section(results), ""]
    if plots.get(CURVES_PLOT):
        lines += ["Held-out loss during training against cumulative training FLOPs:", "",
                  f"![held-out loss vs training FLOPs]({PLOTS_DIR}/{CURVES_PLOT})", ""]
    lines += ["## Specialization × forgetting", "", _specialization_section(results), ""]
    if plots.get(SPECIALIZATION_PLOT):
        lines += [f"![specialization matrix]({PLOTS_DIR}/{SPECIALIZATION_PLOT})", ""]
    merge = _merge_section(results)
    if merge:
        lines += ["## Merging within a family", "", merge, ""]
    routing = _routing_section(results)
    if routing:
        lines += ["## Router usage per domain", "", routing, ""]
    lines += ["## Reproduce", "", "```", _command(results), "```", ""]
    return "\n".join(lines)


def write_report(results: dict, run_dir: Path) -> Path:
    """Write `run_dir/report.md` and its PNGs under `run_dir/plots/`; returns the report path."""
    run_dir = Path(run_dir)
    results = {**results, "models": results.get("models") or {}}
    plot_dir = run_dir / PLOTS_DIR
    plots = {
        BPB_PLOT: plot_bpb(results, plot_dir / BPB_PLOT),
        CURVES_PLOT: plot_curves(results, plot_dir / CURVES_PLOT),
        SPECIALIZATION_PLOT: plot_specialization(results, plot_dir / SPECIALIZATION_PLOT),
    }
    path = run_dir / "report.md"
    atomic_write_text(path, render_report(results, plots))
    return path


# --------------------------------------------------------------------------- several seeds


def _stats(xs: Sequence[float]) -> dict[str, Any]:
    """mean, sample std (None with one value), n, and the values themselves."""
    return {"mean": statistics.fmean(xs) if xs else None,
            "std": statistics.stdev(xs) if len(xs) > 1 else None,
            "n": len(xs), "values": list(xs)}


def aggregate(results_list: list[dict]) -> dict:
    """Combine the results of N seeds of one study into per-arm mean ± sample std.

    Gains are paired: each seed's arm − reference difference first, then mean ± std over seeds
    (the seed-to-seed noise shared by both arms cancels). A model or domain missing in some seeds
    contributes only the seeds that have it; `n` says how many.
    """
    if not results_list:
        raise ValueError("aggregate: no results")
    first = results_list[0]
    doms = _domains(first)
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
                entry[key][d] = _stats([v for m in entries if (v := _bpb(m, d, key)) is not None])
        entry["bpb_mean"] = _stats([v for m in entries
                                    if (v := _mean([_bpb(m, d) for d in doms])) is not None])
        for key in ("train_flops", "tokens", "active_params", "total_params"):
            entry[key] = entries[0].get(key)
        models[name] = entry

    gain: dict[str, dict[str, dict[str, Any]]] = {}
    if ref is not None:
        for label, name in arms.items():
            if label == ref[0]:
                continue
            row: dict[str, dict[str, Any]] = {}
            for d in [*doms, "mean"]:
                deltas, rels, wins = [], [], 0
                for r in results_list:
                    ms = r.get("models") or {}
                    a, b = ms.get(name), ms.get(ref[1])
                    if d == "mean":
                        x, y = _mean([_bpb(a, e) for e in doms]), _mean([_bpb(b, e) for e in doms])
                    else:
                        x, y = _bpb(a, d), _bpb(b, d)
                    if x is None or y is None:
                        continue
                    deltas.append(x - y)
                    rels.append(100.0 * (x - y) / y if y else math.nan)
                    wins += x - y < -_TIE
                row[d] = {"delta": _stats(deltas), "rel_pct": _stats(rels), "wins": wins}
            gain[label] = row

    return {
        "name": first.get("name"),
        "seeds": [r.get("seed") for r in results_list],
        "n": len(results_list),
        "domains": doms,
        "experts": first.get("experts"),
        "split_method": first.get("split_method"),
        "device": first.get("device"),
        "wall_s": [r.get("wall_s") for r in results_list],
        "command": first.get("command"),
        "arms": arms,
        "reference_arm": ref[0] if ref else None,
        "experts_arm": (lambda e: e[0] if e else None)(experts_arm(first)),
        "models": models,
        "gains": gain,
    }


def render_aggregate_report(agg: dict, plot: bool = False) -> str:
    doms = list(agg.get("domains") or [])
    models = agg.get("models") or {}
    arms = [(label, name) for label, name in (agg.get("arms") or {}).items() if name in models]
    if not arms:
        arms = [(n, n) for n in models]
    seeds = ", ".join(str(s) for s in agg.get("seeds") or [])
    walls = [w for w in agg.get("wall_s") or [] if _is_num(w)]
    lines = [
        f"# moe-forge study report: {agg.get('name', 'run')} ({agg.get('n', 0)} seeds)",
        "",
        f"- seeds: {seeds}; device: {agg.get('device', '-')}; total wall time "
        f"{format_seconds(sum(walls)) if walls else '-'}",
        f"- domains: {', '.join(doms) or '-'}; "
        f"experts: {', '.join(agg.get('experts') or []) or '-'}; "
        f"split method: {agg.get('split_method', '-')}",
        "- every number is mean ± sample standard deviation over seeds",
        "",
        "## Answer",
        "",
    ]
    ref, exp = agg.get("reference_arm"), agg.get("experts_arm")
    gains = agg.get("gains") or {}
    if ref and exp in gains:
        parts = [f"**{exp}** vs **{ref}** (Δbpb = experts − reference, paired per seed, "
                 "mean ± std over seeds):"]
        for d in doms:
            g = gains[exp][d]
            n = g["delta"]["n"]
            if not n:
                parts.append(f"on **{d}** there is no comparison;")
                continue
            verdict = "beats" if g["delta"]["mean"] < -_TIE else "does not beat"
            parts.append(f"on **{d}** it {verdict} it on average, "
                         f"{format_mean_std(g['delta']['mean'], g['delta']['std'], signed=True)} "
                         f"bpb ({format_pct(g['rel_pct']['mean'])}), lower in {g['wins']}/{n} "
                         "seeds;")
        parts[-1] = parts[-1][:-1] + "."
        lines.append(" ".join(parts))
    else:
        lines.append("No comparison: the results hold no compute-matched reference or no "
                     "experts arm.")
    lines += ["", "## Per-domain bits per byte", ""]
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
            cell = format_mean_std(s["mean"], s["std"])
            cells.append(bold(cell) if s["n"] and s["mean"] == best.get(d) else cell)
        ns = [models[name]["bpb"][d]["n"] for d in doms]
        n_cell = str(max(ns)) if min(ns) == max(ns) else f"{min(ns)}–{max(ns)}"
        rows.append([label, f"`{name}`", *cells, n_cell])
    lines.append(format_table(["arm", "model", *doms, "mean", "n"], rows,
                              ["l", "l"] + ["r"] * (len(doms) + 2)))
    lines.append("")
    if plot:
        lines += [f"![bits per byte by domain]({PLOTS_DIR}/{BPB_PLOT})", ""]
    lines += ["## Gains vs the compute-matched monolithic model", ""]
    if ref and gains:
        lines.append(f"Reference: {ref}. Cells: Δbpb = arm − reference (negative = better), "
                     "relative change, seeds where the arm is lower.")
        lines.append("")
        rows = []
        arm_model = dict(arms)
        for label, row in gains.items():
            cells = []
            for d in [*doms, "mean"]:
                g = row[d]
                if not g["delta"]["n"]:
                    cells.append("-")
                    continue
                ms = format_mean_std(g["delta"]["mean"], g["delta"]["std"], signed=True)
                pct = format_pct(g["rel_pct"]["mean"])
                cells.append(f"{ms} ({pct}; {g['wins']}/{g['delta']['n']})")
            rows.append([label, f"`{arm_model.get(label, '-')}`", *cells])
        lines.append(format_table(["arm", "model", *doms, "mean"], rows,
                                  ["l", "l"] + ["r"] * (len(doms) + 1)))
    else:
        lines.append("No compute-matched reference.")
    lines += ["", "## Reproduce", "", "```",
              _command(agg) + (f"  # --seeds {agg.get('n')}" if not agg.get("command") else ""),
              "```", ""]
    return "\n".join(lines)


def plot_aggregate(agg: dict, path: Path) -> bool:
    doms = list(agg.get("domains") or [])
    models = agg.get("models") or {}
    arms = [(label, name) for label, name in (agg.get("arms") or {}).items() if name in models]
    if not arms or not doms:
        return False
    series = []
    for label, name in arms:
        stats = [*(models[name]["bpb"][d] for d in doms), models[name]["bpb_mean"]]
        series.append((label, [s["mean"] for s in stats], [s["std"] for s in stats]))
    _grouped_bars(path, [*doms, "mean"], series,
                  f"Held-out bits per byte, mean ± std over {agg.get('n')} seeds",
                  agg.get("reference_arm"))
    return True


def write_aggregate_report(agg: dict, run_dir: Path) -> Path:
    """Write `run_dir/report.md` (+ `plots/bpb_by_domain.png` with error bars) for N seeds."""
    run_dir = Path(run_dir)
    plotted = plot_aggregate(agg, run_dir / PLOTS_DIR / BPB_PLOT)
    path = run_dir / "report.md"
    atomic_write_text(path, render_aggregate_report(agg, plot=plotted))
    return path
