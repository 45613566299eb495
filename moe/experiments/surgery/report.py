"""Reports of the surgery measurements (moe/experiments/surgery/study.py): report.md, results.json
and plots/ in the run directory. Intervals: 95% t over seeds (moe/eval/stats.py); comparisons
are paired by seed (same data order and held-out batches)."""

from __future__ import annotations

from pathlib import Path

from moe.config import Recipe
from moe.eval.stats import format_summary, summarize, summarize_paired
from moe.experiments.init.report import steps_to
from moe.io.checkpoint import atomic_write_text, write_json

ci = summarize  # per-seed values (None: a seed without one) -> {"mean", "half", "n"}


def pci(a: list[float], b: list[float]) -> dict:
    """Paired a − b over seeds: {"mean", "half", "n", "verdict"}."""
    return summarize_paired(a, b, with_verdict=True)


def fmt(d: dict | None, digits: int = 3, pct: bool = False) -> str:
    """ "1.234 ± 0.010", or as a percentage ("12.5 ± 1.0%"); "n/a" when missing."""
    return format_summary(d, digits, scale=100.0, unit="%") if pct else format_summary(d, digits)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- growth


def summarise_growth(res: dict) -> dict:
    seeds = [str(s) for s in res["seeds"]]
    runs = res["runs"]
    fs, fb = res["flops_step_small"], res["flops_step_big"]
    sc = runs["scratch"]
    steps_total = sc[seeds[0]]["eval_steps"][-1]
    scratch_flops = steps_total * fb
    thr = {s: sc[s]["bpb"][-1]["mean"] for s in seeds}  # each seed's from-scratch final bpb
    out = {"scratch_final": ci(list(thr.values())), "scratch_flops": scratch_flops,
           "methods": {}}  # fmt: skip
    for m in res["methods"]:
        rows = []
        for s in seeds:
            x = runs[m][s]
            curve = [b["mean"] for b in x["bpb"]]
            reach = steps_to(x["eval_steps"], curve, thr[s])
            small_flops = runs["small"][s]["steps"] * fs
            flops = None if reach is None else small_flops + reach * fb
            saving = None if flops is None else 1 - flops / scratch_flops
            stable = None
            if res.get("decay_start"):
                # before the cool-down: scratch FLOPs to reach the grown model's bpb there
                k = max(j for j, st in enumerate(x["eval_steps"]) if st <= res["decay_start"])
                sc_curve = [b["mean"] for b in sc[s]["bpb"]]
                need = steps_to(sc[s]["eval_steps"], sc_curve, curve[k])
                if need:
                    stable = 1 - (small_flops + x["eval_steps"][k] * fb) / (need * fb)
            rows.append({"seed": s, "start": curve[0], "small": runs["small"][s]["bpb"]["mean"],
                         "final": curve[-1], "reach_step": reach, "flops": flops,
                         "saving": saving, "saving_stable": stable})  # fmt: skip
        out["methods"][m] = {
            "rows": rows,
            "start": ci([r["start"] for r in rows]),
            "start_minus_small": ci([r["start"] - r["small"] for r in rows]),
            "final": ci([r["final"] for r in rows]),
            "final_vs_scratch": pci([r["final"] for r in rows], [thr[s] for s in seeds]),
            "reached": sum(r["reach_step"] is not None for r in rows),
            "saving": ci([r["saving"] for r in rows]),
            "saving_stable": ci([r["saving_stable"] for r in rows]),
        }
    return out


def growth_section(res: dict, out: Path) -> list[str]:
    sm = summarise_growth(res)
    res["summary"] = sm
    small, big = res["small_config"], res["big_config"]
    seeds = [str(s) for s in res["seeds"]]
    n_steps = res["runs"]["scratch"][seeds[0]]["eval_steps"][-1]
    small_steps = res["runs"]["small"][seeds[0]]["steps"]
    L = ["## Growth: grow a trained small model, or train the large one from scratch?", ""]
    L += [f"Small model: dim {small['dim']}, {small['n_layers']} layers, {small['n_heads']} "
          f"heads, FFN {small['ffn_dim']}, trained {small_steps} steps "
          f"({small_steps * res['flops_step_small']:.3g} FLOPs). Large model: dim {big['dim']}, "
          f"{big['n_layers']} layers, {big['n_heads']} heads, FFN {big['ffn_dim']}; from scratch "
          f"{n_steps} steps ({sm['scratch_flops']:.3g} FLOPs), final held-out bpb "
          f"{fmt(sm['scratch_final'])}. Each grown model trains {n_steps} steps (same schedule, "
          f"a fresh optimiser). *Saving* = 1 − (small model's FLOPs + the grown model's FLOPs "
          "until its held-out bpb first reaches the same seed's from-scratch final bpb) / the "
          "from-scratch FLOPs; n/a where a seed never reaches it."
          + (" With a WSD schedule every run drops most in its final cool-down, so the "
             "from-scratch final bpb is only reached there: *saving before the cool-down* "
             "compares the grown model's bpb at its last evaluation before the cool-down with "
             "the FLOPs the from-scratch run needed to reach that bpb (n/a: it never did)."
             if res.get("decay_start") else " Schedule without a cool-down (constant LR after "
             "warm-up)."), ""]  # fmt: skip
    L += ["| method | bpb right after growth | minus the small model's | final bpb | final − "
          "from scratch (paired) | seeds reaching scratch's final | FLOP saving | saving before "
          "the cool-down |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for m, d in sm["methods"].items():
        L.append(f"| {m} | {fmt(d['start'])} | {fmt(d['start_minus_small'], 4)} | "
                 f"{fmt(d['final'])} | {fmt(d['final_vs_scratch'])} "
                 f"({d['final_vs_scratch']['verdict']}) | {d['reached']}/{len(seeds)} | "
                 f"{fmt(d['saving'], 1, pct=True)} | {fmt(d['saving_stable'], 1, pct=True)} "
                 f"({d['saving_stable']['n']} seeds) |")  # fmt: skip
    L += ["", "*bpb right after growth minus the small model's* is 0 (to float noise) for a "
          "function-preserving method: zero/split widening and identity blocks are exact; "
          "stacking is not.", "", "![bpb against FLOPs](plots/growth_bpb_vs_flops.png)",
          ""]  # fmt: skip
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    fb, fs = res["flops_step_big"], res["flops_step_small"]
    for i, m in enumerate(["scratch", *res["methods"]]):
        xs = res["runs"][m][seeds[0]]["eval_steps"]
        off = 0.0 if m == "scratch" else small_steps * fs
        ys = [ci([res["runs"][m][s]["bpb"][k]["mean"] for s in seeds]) for k in range(len(xs))]
        mean = [y["mean"] for y in ys]
        half = [y["half"] or 0.0 for y in ys]
        fl = [off + x * fb for x in xs]
        ax.plot(fl, mean, label=m, color=f"C{i}", lw=1.4)
        ax.fill_between(
            fl,
            [a - b for a, b in zip(mean, half)],
            [a + b for a, b in zip(mean, half)],
            color=f"C{i}",
            alpha=0.2,
            lw=0,
        )
    ax.axhline(sm["scratch_final"]["mean"], color="k", lw=0.7, ls=":")
    ax.set_xlabel("training FLOPs (the small model's included)")
    ax.set_ylabel("held-out bits per byte (mean of domains)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "plots" / "growth_bpb_vs_flops.png", dpi=110)
    plt.close(fig)
    return L


# ----------------------------------------------------------------------------- depth probe


def summarise_probe(res: dict) -> dict:
    seeds = [str(s) for s in res["seeds"]]
    doms = [*res["domains"], "mean"]
    runs = res["runs"]
    out: dict = {"layers": []}
    for i in range(res["n_layers"]):
        row = {"layer": i}
        for op in ("delete", "duplicate"):
            row[op] = {d: pci([runs[s][op][i][d] for s in seeds], [runs[s]["base"][d]
                              for s in seeds]) for d in doms}  # fmt: skip
        row["bi"] = {d: ci([runs[s]["bi"][d][i] for s in seeds]) for d in res["domains"]}
        out["layers"].append(row)
    out["base"] = {d: ci([runs[s]["base"][d] for s in seeds]) for d in doms}
    out["least_harmful_delete"] = {
        d: min(range(res["n_layers"]), key=lambda i: out["layers"][i]["delete"][d]["mean"])
        for d in doms}  # fmt: skip
    out["lowest_bi"] = {
        d: min(range(res["n_layers"]), key=lambda i: out["layers"][i]["bi"][d]["mean"])
        for d in res["domains"]}  # fmt: skip
    out["bi_rank_corr"] = {
        d: spearman([row["bi"][d]["mean"] for row in out["layers"]],
                    [row["delete"][d]["mean"] for row in out["layers"]])
        for d in res["domains"]}  # fmt: skip
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (no ties expected among float means)."""
    ra = {i: r for r, i in enumerate(sorted(range(len(a)), key=lambda i: a[i]))}
    rb = {i: r for r, i in enumerate(sorted(range(len(b)), key=lambda i: b[i]))}
    n = len(a)
    d2 = sum((ra[i] - rb[i]) ** 2 for i in range(n))
    return 1 - 6 * d2 / (n * (n * n - 1)) if n > 1 else float("nan")


def probe_section(res: dict, out: Path) -> list[str]:
    sm = summarise_probe(res)
    res["summary"] = sm
    doms = [*res["domains"], "mean"]
    L = ["## Depth probe: delete or duplicate one layer, no training", ""]
    L += [
        "Base model held-out bpb: "
        + ", ".join(f"{d} {fmt(sm['base'][d])}" for d in doms)
        + ". Cells: Δ bpb against the base model, paired by seed (negative = better).",
        "",
    ]
    L += ["| layer | " + " | ".join(f"delete: {d}" for d in doms) + " | "
          + " | ".join(f"duplicate: {d}" for d in doms) + " | "
          + " | ".join(f"BI {d}" for d in res["domains"]) + " |",
          "|---" * (1 + 2 * len(doms) + len(res["domains"])) + "|"]  # fmt: skip
    for row in sm["layers"]:
        L.append(f"| {row['layer']} | "
                 + " | ".join(fmt(row["delete"][d]) for d in doms) + " | "
                 + " | ".join(fmt(row["duplicate"][d]) for d in doms) + " | "
                 + " | ".join(fmt(row["bi"][d]) for d in res["domains"]) + " |")  # fmt: skip
    L += [""]
    for d in doms:
        i = sm["least_harmful_delete"][d]
        L.append(f"- **{d}**: the cheapest layer to delete is layer {i} (Δ "
                 f"{fmt(sm['layers'][i]['delete'][d])})"
                 + (f"; lowest Block Influence: layer {sm['lowest_bi'][d]}" if d in
                    sm["lowest_bi"] else "") + ".")  # fmt: skip
    L += [
        "",
        "Does Block Influence predict what deleting a layer costs? Spearman rank "
        "correlation between a layer's mean BI and its mean deletion Δ bpb: "
        + ", ".join(f"{d} {sm['bi_rank_corr'][d]:.2f}" for d in res["domains"])
        + ".",
    ]
    helps = [(row["layer"], d) for row in sm["layers"] for d in doms
             if row["duplicate"][d]["verdict"] == "beats"]  # fmt: skip
    L += ["", "Duplicating a single layer lowers bpb (interval below 0) for: "
          + (", ".join(f"layer {i} on {d}" for i, d in helps) if helps else
             "no layer and no domain") + ".", "",
          "![Δ bpb per layer](plots/depth_probe.png)", ""]  # fmt: skip
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    xs = list(range(res["n_layers"]))
    for ax, op in zip(axes, ("delete", "duplicate")):
        for j, d in enumerate(doms):
            m = [sm["layers"][i][op][d]["mean"] for i in xs]
            h = [sm["layers"][i][op][d]["half"] or 0.0 for i in xs]
            ax.errorbar([x + 0.08 * (j - 1.5) for x in xs], m, yerr=h, marker="o", capsize=3,
                        label=d, lw=1)  # fmt: skip
        ax.axhline(0, color="k", lw=0.7)
        ax.set_title(f"{op} one layer")
        ax.set_xlabel("layer")
        ax.set_ylabel("Δ held-out bpb vs the base model")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("symlog", linthresh=0.01)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "plots" / "depth_probe.png", dpi=110)
    plt.close(fig)
    return L


# ----------------------------------------------------------------------------- the report


def write_report(res: dict, out: Path, r: Recipe) -> Path:
    (out / "plots").mkdir(parents=True, exist_ok=True)
    kind = res["kind"]
    if kind == "growth":
        body = growth_section(res, out)
    elif kind == "depth_probe":
        body = probe_section(res, out)
    elif kind == "shrink":
        from moe.experiments.surgery.shrink import shrink_section

        body = shrink_section(res, out)
    else:
        from moe.experiments.surgery.retokenize import retokenize_section

        body = retokenize_section(res, out)
    head = [f"# Surgery: {kind} ({res['name']})", "",
            f"Recipe: `{res.get('recipe')}`; seeds {res['seeds']}; domains "
            f"{', '.join(res['domains'])}. Held-out bpb: documents of the corpora's held-out "
            "split (no run trained on them), mean over domains unless a domain is named. Wall "
            f"time of all runs: {res['train_wall_s']:.0f} s (1 CPU thread); this invocation "
            f"{res['wall_s']:.0f} s.", ""]  # fmt: skip
    write_json(out / "results.json", res)
    path = out / "report.md"
    atomic_write_text(path, "\n".join(head + body) + "\n")
    return path
