"""Reports of the delta experiments: results.json, report.md and plots under the run directory.

sizes: per domain and compression method, the delta's exact size in bytes against the applied
model's held-out bpb on its own domain and on the others, as paired differences to the full
(lossless) fine-tune over seeds; the smallest delta within 0.02 bpb of the full fine-tune.
fleet: per arm, final held-out bpb against the bytes the replicas sent, paired to the
synchronous baseline; the bytes-vs-bpb frontier; within- vs cross-family exchange.
"""

from __future__ import annotations

import math
from pathlib import Path

from moe.config import Recipe
from moe.eval.stats import format_summary, summarize, summarize_paired
from moe.experiments.fleet.fleet import downlink_bytes
from moe.io.checkpoint import atomic_write_text, write_json

TOLERANCE = 0.02  # bpb: "within 0.02 bpb of the full fine-tune" (the closing note)
# share of the fine-tune's own-domain gain over the base a delta keeps: where the fine-tune
# gains less than TOLERANCE (DNA here), "within 0.02 bpb" holds even for no delta at all
KEEP = 0.9


# this report's style: 4 decimals, "—" for a missing value, an undefined (NaN) half-width written
STYLE = {"missing": "—", "drop_nan_half": False}


def _fmt(d: dict | None, digits: int = 4) -> str:
    return format_summary(d, digits, **STYLE)


def _sign(d: dict | None, digits: int = 4) -> str:
    """A difference: "+0.0123 ± 0.0040"."""
    return format_summary(d, digits, signed=True, **STYLE)


# ----------------------------------------------------------------------------- sizes


def summarise_sizes(runs: list[dict], domains: list[str], all_domains: list[str]) -> dict:
    out: dict = {"domains": {}}
    for d in domains:
        rs = sorted([x for x in runs if x["domain"] == d], key=lambda x: x["seed"])
        others = [o for o in all_domains if o != d]
        full = {row["method"]: row for row in rs[0]["rows"]}["lossless"]
        methods = [row["method"] for row in rs[0]["rows"]]
        rows = []
        for m in methods:
            per = [{row["method"]: row for row in x["rows"]}[m] for x in rs]
            fulls = [{row["method"]: row for row in x["rows"]}["lossless"] for x in rs]
            own = [p["bpb"][d] for p in per]
            oth = [sum(p["bpb"][o] for o in others) / len(others) for p in per] if others else []
            oth_full = ([sum(p["bpb"][o] for o in others) / len(others) for p in fulls]
                        if others else [])  # fmt: skip
            gain = [(x["base_bpb"][d] - o) / (x["base_bpb"][d] - f["bpb"][d])
                    for x, o, f in zip(rs, own, fulls)]  # fmt: skip
            rows.append({
                "method": m, "bytes": summarize([p["bytes"] for p in per]),
                "gain_kept": summarize(gain),
                "payload_bytes": summarize([p["payload_bytes"] for p in per]),
                "density": summarize([p["density"] for p in per]),
                "own_bpb": summarize(own),
                "own_vs_full": summarize_paired(own, [p["bpb"][d] for p in fulls]),
                "other_bpb": summarize(oth) if oth else None,
                "other_vs_full": summarize_paired(oth, oth_full) if oth else None,
            })  # fmt: skip
        base_own = rs[0]["base_bpb"][d]
        ok = [row for row in rows if row["own_vs_full"]["mean"] <= TOLERANCE]
        strict = [row for row in rows
                  if row["own_vs_full"]["mean"] + (row["own_vs_full"]["half"] or 0) <= TOLERANCE]
        kept = [row for row in rows if row["gain_kept"]["mean"] >= KEEP]
        out["domains"][d] = {
            "smallest_keeping": (min(kept, key=lambda r: r["bytes"]["mean"])["method"]
                                 if kept else None),
            "full_gain": summarize([x["base_bpb"][d] - f["bpb"][d] for x, f in
                              zip(rs, [{r_["method"]: r_ for r_ in x["rows"]}["lossless"]
                                       for x in rs])]),
            "rows": rows, "base_own_bpb": base_own, "full_bytes": full["bytes"],
            "params": rs[0]["params"], "seeds": [x["seed"] for x in rs],
            "smallest_within": min(ok, key=lambda r: r["bytes"]["mean"])["method"] if ok else None,
            "smallest_within_ci": (min(strict, key=lambda r: r["bytes"]["mean"])["method"]
                                   if strict else None),
        }  # fmt: skip
    return out


def _family(method: str) -> str:
    for key in ("lowrank", "topk", "dare"):
        if method.startswith(key):
            return key + ("+q" if "+" in method else "")
    return "dense" if method != "bitdelta" else "bitdelta"


def _plot_sizes(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms = list(res["domains"])
    fig, axes = plt.subplots(2, len(doms), figsize=(4.6 * len(doms), 7.5), squeeze=False)
    markers = {"dense": "o", "bitdelta": "*", "topk": "v", "topk+q": "^", "dare": "s",
               "dare+q": "D", "lowrank": "<", "lowrank+q": ">"}  # fmt: skip
    colors = dict(zip(markers, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for j, d in enumerate(doms):
        s = res["domains"][d]
        full = next(r for r in s["rows"] if r["method"] == "lossless")
        for row_i, key, lab in ((0, "own_bpb", f"{d} bpb (own domain)"),
                                (1, "other_bpb", "other domains' mean bpb")):  # fmt: skip
            ax = axes[row_i][j]
            if full[key] is None:
                ax.set_visible(False)
                continue
            ref = full[key]["mean"]
            # DARE at low density lands far off; such points sit on the top edge as x
            top = max(ref, s["base_own_bpb"] if row_i == 0 else ref) + (0.3 if row_i == 0
                                                                          else 1.0)
            by_fam: dict[str, list] = {}
            for r in s["rows"]:
                by_fam.setdefault(_family(r["method"]), []).append(r)
            for fam, rows in by_fam.items():
                rows = sorted(rows, key=lambda r: r["bytes"]["mean"])
                xs = [r["bytes"]["mean"] for r in rows]
                ys = [min(r[key]["mean"], top) for r in rows]
                ax.plot(xs, ys, marker=markers[fam], color=colors[fam], lw=0.7, ms=5, label=fam)
                off = [(x, top) for x, r in zip(xs, rows) if r[key]["mean"] > top]
                if off:
                    ax.scatter(*zip(*off), marker="x", color=colors[fam], s=60, zorder=3)
            ax.axhline(ref, color="k", lw=0.8, ls="--", label="full fine-tune")
            if row_i == 0:
                ax.axhline(ref + TOLERANCE, color="g", lw=0.8, ls=":", label=f"+{TOLERANCE} bpb")
                ax.axhline(s["base_own_bpb"], color="r", lw=0.8, ls="-.", label="base")
            ax.set_ylim(top=top + 0.02 * (top - ax.get_ylim()[0]))
            ax.set_xscale("log")
            ax.set_xlabel("delta file size (bytes)")
            ax.set_ylabel(lab)
            ax.set_title(f"fine-tune on {d}" + (" (x: off the scale)" if row_i == 0 else ""))
            if j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    (out / "plots").mkdir(exist_ok=True)
    fig.savefig(out / "plots" / "bpb_vs_bytes.png", dpi=110)
    plt.close(fig)
    return ["plots/bpb_vs_bytes.png"]


def _sizes_md(res: dict, r: Recipe) -> list[str]:
    L = []
    for d, s in res["domains"].items():
        L += [f"## Fine-tune on {d}", "",
              f"{s['params']} parameters; base {s['base_own_bpb']:.4f} bpb on {d}; seeds "
              f"{s['seeds']}. Δ = the applied delta minus the full (lossless) fine-tune, paired "
              "by seed (95% CI). Bytes: the delta file's exact size (payload: its tensors).", "",
              "| method | bytes | payload bytes | density | own bpb | Δ own | gain kept | "
              "other bpb | Δ other |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in sorted(s["rows"], key=lambda x: -x["bytes"]["mean"]):
            L.append(f"| {row['method']} | {row['bytes']['mean']:.0f} | "
                     f"{row['payload_bytes']['mean']:.0f} | {row['density']['mean']:.3f} | "
                     f"{_fmt(row['own_bpb'])} | {_sign(row['own_vs_full'])} | "
                     f"{_fmt(row['gain_kept'], 2)} | "
                     f"{_fmt(row['other_bpb'])} | "
                     f"{_sign(row['other_vs_full']) if row['other_vs_full'] else '—'} |")
        L += ["", f"Smallest delta within {TOLERANCE} bpb of the full fine-tune on {d} (mean Δ): "
              f"**{s['smallest_within'] or 'none'}**; with the whole 95% CI inside: "
              f"**{s['smallest_within_ci'] or 'none'}**. The full fine-tune gains "
              f"{_fmt(s['full_gain'])} bpb over the base on {d}; the smallest delta keeping "
              f"≥ {KEEP:.0%} of that gain (gain kept = (base − delta) / (base − full)): "
              f"**{s['smallest_keeping'] or 'none'}**.", ""]  # fmt: skip
    return L


# ----------------------------------------------------------------------------- fleet


def _own(rec_bpb: dict, families: list[str]) -> float:
    """Mean over the arm's families of each family's model's bpb on its own domain."""
    vals = []
    for f in families:
        g = f if f in rec_bpb else next(k for k in rec_bpb if f in k.split("+"))
        vals.append(rec_bpb[g][f])
    return sum(vals) / len(vals)


def summarise_fleet(runs: list[dict], arms: list[str]) -> dict:
    by_arm: dict[str, list[dict]] = {}
    for x in runs:
        by_arm.setdefault(x["arm"], []).append(x)
    labels = list(dict.fromkeys(x["arm"] for x in runs))
    sync = next((a for a in labels if by_arm[a][0]["sync"]), None)
    rows = []
    for a in labels:
        rs = sorted(by_arm[a], key=lambda x: x["seed"])
        fams = rs[0]["families"]
        own = [_own(x["bpb"][-1], fams) for x in rs]
        row = {"arm": a, "replicas": rs[0]["replicas"], "H": rs[0]["H"], "S": rs[0]["S"],
               "compression": rs[0]["compression"], "outer": rs[0]["outer"],
               "families": fams, "exchange": rs[0]["exchange"], "sync": rs[0]["sync"],
               "bytes": summarize([x["bytes_total"] for x in rs]), "own_bpb": summarize(own),
               "bytes_down": summarize([downlink_bytes(x["sync"], x["replicas"], x["S"],
                                                       x["rounds"], x["params"]) for x in rs]),
               "bytes_both": summarize([x["bytes_total"] + downlink_bytes(
                   x["sync"], x["replicas"], x["S"], x["rounds"], x["params"]) for x in rs]),
               "wall_s": sum(x["wall_s"] for x in rs), "seeds": [x["seed"] for x in rs],
               "final_by_group": {g: {k: summarize([x["bpb"][-1][g][k] for x in rs])
                                      for k in rs[0]["bpb"][-1][g]} for g in rs[0]["bpb"][-1]},
               "train_flops": rs[0]["train_flops"]}  # fmt: skip
        if sync is not None and a != sync:
            srs = {x["seed"]: x for x in by_arm[sync]}
            pairs = [(o, _own(srs[x["seed"]]["bpb"][-1], fams)) for o, x in zip(own, rs)
                     if x["seed"] in srs and set(srs[x["seed"]]["families"]) >= set(fams)]
            if pairs:
                row["vs_sync"] = summarize_paired([p[0] for p in pairs], [p[1] for p in pairs])
        rows.append(row)
    return {"rows": rows, "sync": sync, "frontier": _frontier(rows, "bytes"),
            "frontier_both": _frontier(rows, "bytes_both"),
            "curves": {a: [{"step": s, "bytes": b, "bpb": v} for s, b, v in
                           zip(by_arm[a][0]["eval_steps"], by_arm[a][0]["bytes_up"],
                               by_arm[a][0]["bpb"])] for a in labels}}  # fmt: skip


def _frontier(rows: list[dict], key: str) -> list[str]:
    """The arms no other arm beats with fewer bytes (`key`) and a lower bpb, fewest bytes first."""
    frontier, best = [], math.inf
    for r in sorted(rows, key=lambda r: (r[key]["mean"], r["own_bpb"]["mean"])):
        if r["own_bpb"]["mean"] < best:
            frontier.append(r["arm"])
            best = r["own_bpb"]["mean"]
    return frontier


def _plot_fleet(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 5.5))
    vals = [r["own_bpb"]["mean"] for r in res["rows"]]
    ref = next((r["own_bpb"]["mean"] for r in res["rows"] if r["sync"]), min(vals))
    lo, top = min(vals) - 0.01, ref + 0.15  # diverging arms sit on the top edge as x
    n_off = 0
    for r in res["rows"]:
        y, off = r["own_bpb"]["mean"], r["own_bpb"]["mean"] > top
        n_off += off
        x = r["bytes"]["mean"]
        if off:
            a1.scatter(x, top, marker="x", s=50, color="tab:red")
        else:
            a1.errorbar(x, y, yerr=r["own_bpb"]["half"] or 0, fmt="*" if r["sync"] else "o",
                        ms=11 if r["sync"] else 5, capsize=2,
                        color="k" if r["sync"] else "tab:blue")  # fmt: skip
        a1.annotate(r["arm"] + (f" ({y:.2f})" if off else ""), (x, min(y, top)), fontsize=6,
                    xytext=(4, 3 - 9 * (n_off - 1) if off else 3),
                    textcoords="offset points")  # fmt: skip
    a1.set_ylim(lo, top + 0.01)
    a1.set_xscale("log")
    a1.set_xlabel("bytes sent by the replicas (uplink, total)")
    a1.set_ylabel("final held-out bpb, own domain (95% CI over seeds)")
    a1.set_title("final bpb vs bytes (x: off the scale; ★ sync)")
    for a, pts in res["curves"].items():
        fams = next(r["families"] for r in res["rows"] if r["arm"] == a)
        a2.plot([p["step"] for p in pts], [_own(p["bpb"], fams) for p in pts], label=a, lw=1,
                color="k" if a == res["sync"] else None)  # fmt: skip
    a2.set_ylim(lo, top + 0.15)
    a2.set_xlabel("local steps per replica")
    a2.set_ylabel("held-out bpb, own domain (first seed)")
    a2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    (out / "plots").mkdir(exist_ok=True)
    fig.savefig(out / "plots" / "fleet.png", dpi=110)
    plt.close(fig)
    return ["plots/fleet.png"]


def _fleet_md(res: dict) -> list[str]:
    L = ["## Arms", "",
         "Final held-out bpb of the coordinator's model on its family's own domain (mean over "
         "seeds, 95% CI); Δ vs sync = paired by seed against the synchronous baseline (same "
         "training FLOPs, batch R × B). MB sent: everything the replicas sent (the compressed "
         "deltas' exact serialized sizes; for sync, a float32 gradient per worker per step). "
         "MB received: what the replicas receive as this simulation sends it, uncompressed (the "
         "coordinator's float32 model per replica per round an update arrives; for sync, the "
         "all-reduced float32 gradient per worker per step).", "",
         "| arm | R | H | S | compression | outer | MB sent | MB received | own bpb | Δ vs sync "
         "| wall s |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in res["rows"]:
        L.append(f"| {r['arm']} | {r['replicas']} | {r['H']} | {r['S']} | {r['compression']} | "
                 f"{r['outer']} | {r['bytes']['mean'] / 1e6:.3f} | "
                 f"{r['bytes_down']['mean'] / 1e6:.3f} | {_fmt(r['own_bpb'])} | "
                 f"{_sign(r['vs_sync']) if 'vs_sync' in r else '—'} | {r['wall_s']:.0f} |")
    first = next(iter(res["curves"].values()))[0]["bpb"]
    L += ["", "The base model (step 0): " + ", ".join(
        f"{d} {v:.4f}" for d, v in next(iter(first.values())).items() if d != "mean")
        + " bpb. A single replica (`R=1`) exchanges with no one: its bytes are only its own "
        "deltas' sizes."]
    L += ["", "Bytes-vs-bpb frontier (no arm sends fewer bytes for a lower bpb): "
          + " → ".join(f"`{a}`" for a in res["frontier"]), "",
          "The same, counting the bytes received as well (sent + received): "
          + " → ".join(f"`{a}`" for a in res["frontier_both"]), ""]
    multi = [r for r in res["rows"] if len(r["families"]) > 1]
    if multi:
        L += ["## Within-family vs cross-family exchange", "",
              "Each group's model on every domain (a cross-family group is one model).", "",
              "| arm | model (group) | " + " | ".join(
                  next(iter(multi[0]["final_by_group"].values()))) + " |",
              "|---|---|" + "---|" * len(next(iter(multi[0]["final_by_group"].values())))]
        for r in multi:
            for g, vals in r["final_by_group"].items():
                L.append(f"| {r['arm']} | {g} | " + " | ".join(_fmt(v) for v in vals.values())
                         + " |")
        L.append("")
    return L


# ----------------------------------------------------------------------------- both


def write_report(r: Recipe, runs: list[dict], base_info: dict, out: Path, seeds: int,
                 recipe_path: str | None, wall_s: float) -> Path:  # fmt: skip
    f = r.fleet
    if f.kind == "sizes":
        res = summarise_sizes(runs, list(f.domains), list(r.data.domains))
        plots = _plot_sizes(res, out)
        body = _sizes_md(res, r)
        title = f"Fine-tune delta sizes vs bpb: {r.name}"
    else:
        res = summarise_fleet(runs, list(f.arms))
        plots = _plot_fleet(res, out)
        body = _fleet_md(res)
        title = f"Simulated fleet: {r.name}"
    train_wall = base_info["wall_s"] + sum(x["wall_s"] for x in runs)
    res.update(kind=f.kind, base=base_info, seeds=seeds, recipe=recipe_path, wall_s=wall_s,
               train_wall_s=train_wall)  # fmt: skip
    write_json(out / "results.json", res)
    cmd = f"moe run {recipe_path}" if recipe_path else "moe run"
    L = [f"# {title}", "",
         f"`{cmd}` — base: {base_info['steps']} steps on the mixed stream (train loss "
         f"{base_info['final_train_loss']:.3f}); {seeds} seed(s); this invocation "
         f"{wall_s:.0f} s, all runs {train_wall:.0f} s (1 thread).", ""]  # fmt: skip
    L += body
    L += [f"![{p}]({p})" for p in plots] + [""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(L) + "\n")
    return path
