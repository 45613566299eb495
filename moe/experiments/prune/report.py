"""Aggregation and report of the pruning measurements (moe/experiments/prune/study.py).

Every interval is a 95% Student t interval over seeds (moe/eval/stats.py); a bpb loss is the
pruned model's held-out bpb minus the unpruned model's of the same seed (paired).
"""

from __future__ import annotations

from pathlib import Path

from moe.config import Recipe
from moe.eval.stats import format_summary as _fmt  # this report writes the default style
from moe.eval.stats import summarize, summarize_paired


def _key(row: dict) -> str:
    return f"{row['unit']}|{row['method']}|{row['by']}|{row['frac']:.4f}|{int(row['healed'])}"


# ----------------------------------------------------------------------------- curves


def _ref(run: dict, row: dict) -> dict:
    """The bpb a point is compared with: the unpruned model's, healed the same way for a healed
    point."""
    return run["base_healed"][row["by"]] if row["healed"] else run["base"]


def summarise_curves(runs: list[dict], r: Recipe) -> dict:
    p = r.prune
    domains = list(r.data.domains)
    seeds = [x["seed"] for x in runs]
    base = {d: summarize([x["base"][d] for x in runs]) for d in domains + ["mean"]}
    # loss per point: {key: {eval domain: ci of bpb - base}}, only where every seed has it
    points: dict[str, dict] = {}
    keys = sorted({_key(row) for x in runs for row in x["rows"]})
    for k in keys:
        per_seed = []
        for x in runs:
            hit = [row for row in x["rows"] if _key(row) == k]
            if hit:
                per_seed.append((x, hit[0]))
        if len(per_seed) != len(runs):
            continue
        row0 = per_seed[0][1]
        points[k] = {
            "unit": row0["unit"], "method": row0["method"], "by": row0["by"],
            "frac": row0["frac"], "healed": row0["healed"],
            "params": row0["params"],
            "loss": {d: summarize([row["bpb"][d] - _ref(x, row)[d] for x, row in per_seed])
                     for d in domains + ["mean"]},
        }  # fmt: skip
    # where each domain's own curve breaks: the largest fraction whose loss (and every smaller
    # fraction's) stays within the tolerance, on the mean over seeds
    breaks = {}
    for unit in p.units:
        for method in p.methods:
            for d in domains:
                by = d if method != "random" else "all"
                curve = sorted((v["frac"], v["loss"][d]["mean"]) for v in points.values()
                               if v["unit"] == unit and v["method"] == method and v["by"] == by
                               and not v["healed"])  # fmt: skip
                ok = 0.0
                for frac, loss in curve:
                    if loss > p.tolerance:
                        break
                    ok = frac
                per_seed = []
                for x in runs:
                    c = sorted((row["frac"], row["bpb"][d] - x["base"][d]) for row in x["rows"]
                               if row["unit"] == unit and row["method"] == method
                               and row["by"] == by and not row["healed"])  # fmt: skip
                    o = 0.0
                    for frac, loss in c:
                        if loss > p.tolerance:
                            break
                        o = frac
                    per_seed.append(o)
                breaks[f"{unit}|{method}|{d}"] = {"removable": ok, "per_seed": per_seed}
    # 3x3 matrices (taylor) at the matrix fraction: rows = scoring domain, cols = eval domain
    matrices = {}
    for unit in p.units:
        fr = min({v["frac"] for v in points.values() if v["unit"] == unit},
                 key=lambda f: abs(f - p.matrix_fraction), default=None)  # fmt: skip
        if fr is None:
            continue
        # layers rank by Block Influence under both taylor and magnitude: one matrix
        methods = [m for m in p.methods if m != "random"][:1 if unit == "layers" else None]
        for method in methods:
            mat = {}
            for a in domains + ["all"]:
                k = f"{unit}|{method}|{a}|{fr:.4f}|0"
                if k in points:
                    mat[a] = {b: points[k]["loss"][b] for b in domains}
            # the diagonal advantage: own-domain scores vs the other domains' scores, paired
            adv = {}
            for b in domains:
                own, other = [], []
                for x in runs:
                    get = {row["by"]: row["bpb"][b] for row in x["rows"]
                           if row["unit"] == unit and row["method"] == method
                           and abs(row["frac"] - fr) < 1e-9 and not row["healed"]}  # fmt: skip
                    if b in get and all(a in get for a in domains):
                        own.append(get[b])
                        other.append(sum(get[a] for a in domains if a != b) / (len(domains) - 1))
                if own:
                    adv[b] = summarize_paired(own, other)
            matrices[f"{unit}|{method}"] = {"frac": fr, "matrix": mat, "own_minus_other": adv}
    jac = {}
    for name in runs[0]["jaccard"]:
        jac[name] = {pair: summarize([x["jaccard"][name][pair] for x in runs])
                     for pair in runs[0]["jaccard"][name]}  # fmt: skip
    keep = 1.0 - p.matrix_fraction
    return {
        "kind": "curves", "seeds": seeds, "domains": domains, "base": base,
        "params": runs[0]["params"], "points": points, "breaks": breaks, "matrices": matrices,
        "jaccard": jac, "jaccard_chance": keep / (2 - keep), "keep": keep,
        "tolerance": p.tolerance, "influence": {x["seed"]: x["influence"] for x in runs},
        "train": [x["train"] for x in runs], "units": list(p.units), "methods": list(p.methods),
        "heal_steps": p.heal_steps,
        "base_healed": {by: {d: summarize([x["base_healed"][by][d] for x in runs])
                             for d in domains + ["mean"]}
                        for by in runs[0].get("base_healed", {})},
    }  # fmt: skip


def _curves_plot(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms, units = res["domains"], res["units"]
    fig, axes = plt.subplots(len(units), len(doms), figsize=(4.2 * len(doms), 3.3 * len(units)),
                             squeeze=False, sharey="row")  # fmt: skip
    color = {m: f"C{i}" for i, m in enumerate(res["methods"])}
    for i, unit in enumerate(units):
        for j, d in enumerate(doms):
            ax = axes[i][j]
            for m in res["methods"]:
                for healed in (False, True):
                    by = d if m != "random" else "all"
                    pts = sorted((v["frac"], v["loss"][d]) for v in res["points"].values()
                                 if v["unit"] == unit and v["method"] == m and v["by"] == by
                                 and v["healed"] == healed)  # fmt: skip
                    if not pts:
                        continue
                    xs = [0.0] + [f for f, _ in pts]
                    ys = [0.0] + [c["mean"] for _, c in pts]
                    hs = [0.0] + [c["half"] or 0.0 for _, c in pts]
                    ax.plot(xs, ys, "o-" if not healed else "s--", color=color[m], ms=3,
                            label=f"{m}{' healed' if healed else ''}")  # fmt: skip
                    ax.fill_between(xs, [a - b for a, b in zip(ys, hs)],
                                    [a + b for a, b in zip(ys, hs)], color=color[m], alpha=0.15,
                                    lw=0)  # fmt: skip
            ax.axhline(res["tolerance"], color="k", lw=0.8, ls=":")
            ax.set_yscale("symlog", linthresh=0.05)
            ax.set_title(f"{unit}: {d} (scored by {d})", fontsize=9)
            ax.set_xlabel(f"fraction of {unit} removed")
            ax.grid(alpha=0.3)
        axes[i][0].set_ylabel("Δ held-out bpb")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    (out / "plots").mkdir(exist_ok=True)
    fig.savefig(out / "plots" / "curves.png", dpi=100)
    plt.close(fig)
    return ["plots/curves.png"]


def _curves_report(res: dict) -> list[str]:
    doms = res["domains"]
    L = ["## Unpruned model", "",
         f"{res['params']:,} parameters; held-out bpb "
         + ", ".join(f"{d} {_fmt(res['base'][d])}" for d in doms)
         + f" (mean {_fmt(res['base']['mean'])}; {len(res['seeds'])} seeds).", ""]
    if res["base_healed"]:
        L += [f"Healed points are compared with the unpruned model healed the same way "
              f"({res['heal_steps']} steps on the scoring domain's stream; the healing is "
              "training, so it lowers the unpruned model's bpb too): mean bpb "
              + ", ".join(f"by {by} {_fmt(v['mean'])}" for by, v in res["base_healed"].items())
              + ".", ""]
    L += [f"## Removable fraction at ≤ {res['tolerance']} bpb loss (each domain scored by its "
          "own calibration data; mean curve over seeds, per-seed values in brackets)", "",
          "| unit | method | " + " | ".join(doms) + " |",
          "|---|---|" + "---:|" * len(doms)]  # fmt: skip
    for unit in res["units"]:
        for m in res["methods"]:
            cells = []
            for d in doms:
                b = res["breaks"][f"{unit}|{m}|{d}"]
                seeds = ", ".join(f"{v:.3g}" for v in b["per_seed"])
                cells.append(f"{b['removable']:.3g} [{seeds}]")
            L.append(f"| {unit} | {m} | " + " | ".join(cells) + " |")
    L += ["", "![curves](plots/curves.png)", "",
          "## Loss per point (Δ bpb on each domain; scored by `by`)", "",
          "| unit | method | by | fraction | healed | params | " + " | ".join(doms)
          + " | mean |", "|---|---|---|---:|---|---:|" + "---:|" * (len(doms) + 1)]  # fmt: skip
    for v in sorted(res["points"].values(), key=lambda v: (v["unit"], v["method"], v["by"],
                                                            v["frac"], v["healed"])):  # fmt: skip
        L.append(f"| {v['unit']} | {v['method']} | {v['by']} | {v['frac']:.3g} | "
                 f"{'yes' if v['healed'] else ''} | {v['params']:,} | "
                 + " | ".join(_fmt(v["loss"][d]) for d in doms + ["mean"]) + " |")  # fmt: skip
    L += ["", "## Pruned with domain A's scores, evaluated on domain B (Δ bpb)", ""]
    for name, mt in res["matrices"].items():
        L += [f"**{name}**, fraction {mt['frac']:.3g} removed (rows: scores of; columns: "
              "evaluated on)", "", "| scored by | " + " | ".join(doms) + " |",
              "|---|" + "---:|" * len(doms)]  # fmt: skip
        for a, row in mt["matrix"].items():
            L.append(f"| {a} | " + " | ".join(_fmt(row[b]) for b in doms) + " |")
        L += ["", "Own scores minus the mean of the other domains' scores, paired by seed "
              "(below 0: a domain's own scores keep what it needs better): "
              + ", ".join(f"{b} {_fmt(v)}" for b, v in mt["own_minus_other"].items()), ""]
    L += [f"## Overlap of the units each domain keeps (top {res['keep']:.0%} by score, per "
          f"layer; Jaccard; chance {res['jaccard_chance']:.3f})", "",
          "| score | " + " | ".join(next(iter(res["jaccard"].values()))) + " |",
          "|---|" + "---:|" * len(next(iter(res["jaccard"].values())))]  # fmt: skip
    for name, pairs in res["jaccard"].items():
        L.append(f"| {name} | " + " | ".join(_fmt(v) for v in pairs.values()) + " |")
    return L


# ----------------------------------------------------------------------------- compress


def summarise_compress(runs: list[dict], r: Recipe, budget: dict) -> dict:
    p = r.prune
    seeds = sorted({x["seed"] for x in runs})
    table = {}
    for size in p.sizes:
        for level in p.levels:
            vals, byts, params = [], [], []
            for sd in seeds:
                run = next(x for x in runs if x["size"] == size and x["seed"] == sd)
                pt = next(q for q in run["points"] if q["level"] == level)
                if "skipped" in pt:
                    break
                vals.append(pt["bpb"]["mean"])
                byts.append(pt["bytes"])
                params.append(pt["params"])
            if len(vals) != len(seeds):
                continue
            table[f"{size}|{level}"] = {"size": size, "level": level, "bpb": summarize(vals),
                                        "bpb_per_seed": vals, "bytes": sum(byts) / len(byts),
                                        "params": params[0]}  # fmt: skip
    pts = list(table.values())
    front = [a for a in pts if not any(
        b["bytes"] <= a["bytes"] and b["bpb"]["mean"] < a["bpb"]["mean"] and b is not a
        for b in pts)]  # fmt: skip
    order = {s: i for i, s in enumerate(p.sizes)}
    by_params = sorted(p.sizes, key=lambda s: next(
        x["train"]["params"] for x in runs if x["size"] == s))  # fmt: skip
    # does a compressed larger model beat each smaller uncompressed one at no more bytes?
    duels = []
    for small in by_params:
        ref = table.get(f"{small}|fp16")
        if ref is None:
            continue
        cands = [v for v in pts if by_params.index(v["size"]) > by_params.index(small)
                 and v["bytes"] <= ref["bytes"]]  # fmt: skip
        if not cands:
            duels.append({"small": small, "bytes": ref["bytes"], "best": None})
            continue
        best = min(cands, key=lambda v: v["bpb"]["mean"])
        diff = summarize_paired(best["bpb_per_seed"], ref["bpb_per_seed"])
        duels.append({"small": small, "bytes": ref["bytes"], "small_bpb": ref["bpb"],
                      "best": f"{best['size']}|{best['level']}", "best_bytes": best["bytes"],
                      "best_bpb": best["bpb"], "diff": diff})  # fmt: skip
    return {"kind": "compress", "seeds": seeds, "budget": budget, "table": table,
            "frontier": [f"{v['size']}|{v['level']}" for v in
                         sorted(front, key=lambda v: v["bytes"])],
            "duels": duels, "sizes": list(p.sizes), "levels": list(p.levels),
            "size_order": order,
            "train": {f"{x['size']}|{x['seed']}": x["train"] for x in runs}}  # fmt: skip


def _compress_plot(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, size in enumerate(res["sizes"]):
        pts = sorted((v["bytes"], v["bpb"], v["level"]) for v in res["table"].values()
                     if v["size"] == size)  # fmt: skip
        xs = [b for b, _, _ in pts]
        ys = [c["mean"] for _, c, _ in pts]
        es = [c["half"] or 0.0 for _, c, _ in pts]
        ax.errorbar(xs, ys, yerr=es, fmt="o", color=f"C{i}", ms=4, capsize=2, label=size)
        for b, c, lv in pts:
            if lv == "fp16":
                ax.plot([b], [c["mean"]], "*", color=f"C{i}", ms=12)
    fr = [res["table"][k] for k in res["frontier"]]
    ax.plot([v["bytes"] for v in fr], [v["bpb"]["mean"] for v in fr], "k-", lw=0.8,
            label="Pareto frontier")  # fmt: skip
    ax.set_xscale("log")
    # the interesting band: a few seeds' t intervals and broken compressions would flatten it
    lo = min(v["bpb"]["mean"] for v in res["table"].values())
    ax.set_ylim(lo - 0.1, lo + 1.0)
    ax.set_xlabel("weight bytes (fp16 = 2 per parameter; int8/int4 with fp16 group scales)")
    ax.set_ylabel("held-out bpb (mean of domains)")
    ax.set_title("equal training FLOPs; ★ uncompressed; bars: 95% t over seeds (clipped)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    (out / "plots").mkdir(exist_ok=True)
    fig.savefig(out / "plots" / "pareto.png", dpi=100)
    plt.close(fig)
    return ["plots/pareto.png"]


def _compress_report(res: dict) -> list[str]:
    b = res["budget"]
    L = ["## Sizes at one training budget", "",
         f"Budget: {b['flops']:.3g} training FLOPs (the largest size, {b['largest']}, trains "
         f"{b['steps'][b['largest']]} steps); {len(res['seeds'])} seeds.", "",
         "| size | params | steps | tokens |", "|---|---:|---:|---:|"]  # fmt: skip
    for s in res["sizes"]:
        t = next(v for k, v in res["train"].items() if k.startswith(s + "|"))
        L.append(f"| {s} | {t['params']:,} | {t['steps']} | {t['tokens']:,} |")
    L += ["", "![pareto](plots/pareto.png)", "", "## Every size × compression level", "",
          "| size | level | params | weight bytes | held-out bpb | on the frontier |",
          "|---|---|---:|---:|---:|---|"]  # fmt: skip
    for k, v in sorted(res["table"].items(), key=lambda kv: kv[1]["bytes"]):
        L.append(f"| {v['size']} | {v['level']} | {v['params']:,} | {v['bytes']:,.0f} | "
                 f"{_fmt(v['bpb'])} | {'yes' if k in res['frontier'] else ''} |")
    L += ["", "## Does a compressed larger model beat each smaller uncompressed one at no more "
          "bytes?", "", "| smaller model (fp16) | its bytes | its bpb | best larger compressed "
          "model within those bytes | bytes | bpb | Δ bpb (paired) |",
          "|---|---:|---:|---|---:|---:|---:|"]  # fmt: skip
    for d in res["duels"]:
        if d["best"] is None:
            L.append(f"| {d['small']} | {d['bytes']:,.0f} | | none fits | | | |")
            continue
        L.append(f"| {d['small']} | {d['bytes']:,.0f} | {_fmt(d['small_bpb'])} | "
                 f"{d['best'].replace('|', ' ')} | "
                 f"{d['best_bytes']:,.0f} | {_fmt(d['best_bpb'])} | {_fmt(d['diff'])} |")
    return L


def write_report(res: dict, out: Path) -> Path:
    from moe.io.checkpoint import atomic_write_text

    if res["kind"] == "curves":
        title = "# Pruning per domain: bpb against the fraction removed"
        _curves_plot(res, out)
        body = _curves_report(res)
    else:
        title = "# Train large, then compress: bpb against weight bytes at equal training FLOPs"
        _compress_plot(res, out)
        body = _compress_report(res)
    trains = res["train"].values() if isinstance(res["train"], dict) else res["train"]
    head = [title, "", f"Recipe: `{res.get('recipe')}`. Training wall time "
            f"{sum(t['wall_s'] for t in trains) / 60:.1f} min in all (1 thread; the measured total "
            "is in the recipe's header). Intervals: 95% t over seeds.", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(head + body) + "\n")
    return path
