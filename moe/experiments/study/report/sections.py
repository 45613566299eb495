"""The single-run report: the markdown sections of `report.md`, `render_report`, `write_report`."""

from __future__ import annotations

from pathlib import Path

from moe.eval.evaluate import describe_protocol
from moe.experiments.study.report.format import (
    TIE,
    bold,
    format_count,
    format_delta,
    format_flops,
    format_num,
    format_pct,
    format_seconds,
    format_table,
    is_num,
    routing_accuracy_lines,
)
from moe.experiments.study.report.plots import (
    BPB_PLOT,
    CURVES_PLOT,
    PLOTS_DIR,
    SPECIALIZATION_PLOT,
    plot_bpb,
    plot_curves,
    plot_specialization,
)
from moe.experiments.study.report.results import (
    arm_table,
    branches,
    command_line,
    complete_mean,
    domains,
    eval_sets_view,
    experts_arm,
    forgetting,
    gains,
    model_bpb,
    reference,
    seed_model,
    specialization_matrix,
)
from moe.io.checkpoint import atomic_write_text


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
        for d in domains(results):
            e, r = model_bpb(models[exp[1]], d), model_bpb(models[ref[1]], d)
            if e is None or r is None:
                side = exp[1] if e is None else ref[1]
                parts.append(f"on **{d}** there is no comparison (`{side}` has no bpb).")
                continue
            delta = e - r
            rel = 100.0 * delta / r if r else float("nan")
            verdict = "beats" if delta < -TIE else "does not beat"
            parts.append(f"on **{d}** it {verdict} it, {format_num(e)} vs {format_num(r)} "
                         f"({format_delta(delta)} bpb, {format_pct(rel)});")
        em = complete_mean([model_bpb(models[exp[1]], d) for d in domains(results)])
        rm = complete_mean([model_bpb(models[ref[1]], d) for d in domains(results)])
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
    models, doms = results["models"], domains(results)
    arms = arm_table(results)
    if not arms:
        return "No evaluated models."
    values = [[model_bpb(models[name], d) for d in doms] for _, name in arms]
    values = [v + [complete_mean(v)] for v in values]
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


def _gains_section(results: dict) -> str:
    ref = reference(results)
    if ref is None:
        return "No compute-matched monolithic model in the results: nothing to compare against."
    doms = domains(results)
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
            return sum(s[key] for s in stages if is_num(s.get(key)))

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
        ratio = f"×{f / ref_flops:.2f}" if is_num(f) and is_num(ref_flops) and ref_flops else "-"
        rows.append([label, f"`{name}`", format_flops(f), ratio, format_count(m.get("tokens")),
                     format_count(m.get("active_params")), format_count(m.get("total_params"))])
    if rows:
        out.append("Per-arm totals (training FLOPs of everything the model descends from; "
                   "ratio vs the reference):")
        out.append(format_table(["arm", "model", "train FLOPs", "vs ref", "tokens",
                                 "active params", "total params"], rows,
                                ["l", "l"] + ["r"] * 5))
    return "\n\n".join(out)


def _specialization_section(results: dict) -> str:
    doms = domains(results)
    names, owns, bpb, delta = specialization_matrix(results)
    if not branches(results):
        return "No branch models in the results."
    seed_name = seed_model(results)
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
    models, doms = results["models"], domains(results)
    if not merge or merge.get("output") not in models:
        return None
    family = merge.get("domain") or merge.get("family")
    inputs = [n for n in merge.get("inputs") or [] if n in models]
    rows = []
    start = f"branch-{family}"
    if start in models:
        rows.append([f"`{start}` (start)",
                     *[format_num(model_bpb(models[start], d)) for d in doms]])
    for n in inputs:
        rows.append([f"`{n}`", *[format_num(model_bpb(models[n], d)) for d in doms]])
    ft_mean = []
    for d in doms:
        vals = [model_bpb(models[n], d) for n in inputs]
        ft_mean.append(complete_mean(vals) if vals else None)
    best_ft = [min((v for n in inputs if (v := model_bpb(models[n], d)) is not None), default=None)
               for d in doms]
    out = merge["output"]
    merged = [model_bpb(models[out], d) for d in doms]
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
    doms = [d for d in domains(results) if d in share] + [d for d in share
                                                            if d not in domains(results)]
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


PROTOCOLS = {
    "fork": "fork (BTM/FlexOlmo): the branches fork from the seed run in its stable phase, with "
    "its weights, AdamW state, step and learning rate, and cool down at their end; the "
    "compute-matched monolith is the seed run itself continued to the budget",
    "rewarm": "rewarm (ablation): every stage after the seed restarts from the seed's weights "
    "with a fresh optimizer and its own warm-up",
}


def _protocol_section(results: dict) -> str | None:
    """How the budget was shared, and what each arm read of each domain (tokens and epochs)."""
    b = results.get("budget")
    if not b:
        return None
    out = [f"- protocol: {PROTOCOLS.get(results.get('protocol'), results.get('protocol'))}."]
    ev = results.get("eval_protocol")
    out.append("- evaluation: " + (describe_protocol(ev).removeprefix("protocol: ") if ev else
               "packed chunks of data.seq_len tokens, study.eval_batches batches per domain (a "
               "sample; the protocol was not recorded in this result)") + ".")
    ratio = b["expert_flops_after_seed"] / max(b["monolith_flops_after_seed"], 1.0)
    out.append(
        f"- budget: {format_count(b['total_steps'])} steps of {format_count(b['tokens_per_step'])} "
        f"tokens for the monolith; seed {format_count(b['seed_steps'])} steps; then "
        f"{b['n_branches']} branches × {format_count(b['branch_steps'])} steps, "
        f"{b['n_finetunes']} fine-tunes × {format_count(b['finetune_steps'])} steps and a MoE "
        f"fine-tune of {format_count(b['moe_steps'])} steps; the experts' post-seed FLOPs are "
        f"{ratio:.3f}× the monolith's."
    )
    doms = domains(results)
    train = results.get("train_tokens_by_domain") or {}
    if train:
        out.append("- training tokens available per domain: "
                   + ", ".join(f"{d} {format_count(train.get(d))}" for d in doms) + ".")
    rows = []
    for label, name in arm_table(results):
        m = results["models"][name]
        tok = m.get("tokens_by_domain") or {}
        ep = m.get("epochs_by_domain") or {}
        rows.append([label, *[f"{format_count(tok.get(d, 0))} ({format_num(ep.get(d), 2)})"
                              for d in doms]])
    if rows:
        out.append("")
        out.append("In-domain training tokens of each arm's lineage (epochs over that domain's "
                   "training split in parentheses); data repetition beyond a few epochs "
                   "helps less (Muennighoff et al. 2023):")
        out.append("")
        out.append(format_table(["arm", *doms], rows, ["l"] + ["r"] * len(doms)))
    return "\n".join(out)


def _eval_sets_intro(results: dict) -> str:
    specs = ", ".join(f"`{x}`" for x in results.get("eval_data") or []) or "-"
    return (f"`study.eval_data`: {specs}. Every document of each set is evaluated (none was "
            "trained on, unless the set repeats a training corpus); the mean is over these sets.")


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
        f"- domains: {', '.join(domains(results)) or '-'}; experts: {experts}; "
        f"split method: {results.get('split_method', '-')}",
        "- seeds: one (no confidence interval; run with `--seeds N` for one)",
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
    doms = domains(results)
    lines += routing_accuracy_lines(
        [(label, acc) for label, name in arm_table(results)
         if (acc := {d: v for d in doms
                     if (v := model_bpb(results["models"].get(name), d, "route_accuracy"))
                     is not None})])  # fmt: skip
    if plots.get(BPB_PLOT):
        lines += [f"![bits per byte by domain]({PLOTS_DIR}/{BPB_PLOT})", ""]
    lines += ["## Gains vs the compute-matched monolithic model", "", _gains_section(results), ""]
    view = eval_sets_view(results)
    if view is not None:
        lines += ["## Other held-out sets", "", _eval_sets_intro(results), "",
                  _bpb_section(view), "", _gains_section(view), ""]
    lines += ["## Compute ledger", "", _ledger_section(results), ""]
    protocol = _protocol_section(results)
    if protocol:
        lines += ["## Protocol and data exposure", "", protocol, ""]
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
    if results.get("samples"):
        lines += [results["samples"].rstrip("\n"), ""]
    lines += ["## Reproduce", "", "```", command_line(results), "```", ""]
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
