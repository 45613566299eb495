"""Aggregation and report of the init-from-distribution study (moe/experiments/init/study.py).

Every interval is a 95% Student t interval over seeds (moe/eval/stats.py). Comparisons with the
`standard` arm are paired by seed (same data order, same held-out batches) and made within the
same warm-up setting.
"""

from __future__ import annotations

import math
from pathlib import Path

from moe.config import Recipe
from moe.eval.stats import format_summary as _fmt  # this report writes the default style
from moe.eval.stats import paired_diff_ci, summarize, verdict
from moe.io.checkpoint import atomic_write_text

CONTROL = "standard"


def steps_to(steps: list[int], values: list[float], thr: float) -> float | None:
    """First step (linearly interpolated between evaluations) at which `values` ≤ `thr`."""
    for i, (s, v) in enumerate(zip(steps, values)):
        if v <= thr:
            if i == 0:
                return float(s)
            s0, v0 = steps[i - 1], values[i - 1]
            return s0 + (s - s0) * (v0 - thr) / (v0 - v) if v0 != v else float(s)
    return None


def summarise(runs: list[dict], r: Recipe, arms: list[str], source: dict, flops_step: float,
              seeds: int) -> dict:  # fmt: skip
    s = r.init_study
    by = {(x["arm"], x["warmup"], x["seed"]): x for x in runs}
    seed_ids = [r.seed + i for i in range(seeds)]
    w_ref = s.warmup[0]
    ctrl = [by[(CONTROL, w_ref, sd)] for sd in seed_ids]
    steps = ctrl[0]["eval_steps"]
    ctrl_mean = [sum(x["bpb"][k]["mean"] for x in ctrl) / len(ctrl) for k in range(len(steps))]
    thresholds = []
    for frac in s.thresholds_at:
        k = min(range(len(steps)), key=lambda j: abs(steps[j] - frac * s.steps))
        # the slowest control seed's value there: every control seed reaches each threshold
        worst = max(x["bpb"][k]["mean"] for x in ctrl)
        thresholds.append({"at": frac, "step": steps[k], "bpb": worst, "mean": ctrl_mean[k]})
    # equal-step comparison points: early, midway, end
    points = sorted({min(range(len(steps)), key=lambda j: abs(steps[j] - f * s.steps))
                     for f in (0.1, 0.5, 1.0)})  # fmt: skip
    out: dict = {
        "source": source, "arms": arms, "warmup": list(s.warmup), "seeds": seed_ids,
        "target_lr": s.target_lr or r.optim.lr, "source_lr": r.optim.lr,
        "steps": s.steps, "eval_steps": steps, "flops_per_step": flops_step,
        "thresholds": thresholds, "curves": {}, "steps_to_threshold": {}, "ratio_to_standard": {},
        "gain_at_steps": {}, "final_bpb": {}, "warmup_ablation": {}, "diverged": {},
        "diagnostics": {},
    }  # fmt: skip
    for arm in arms:
        for w in s.warmup:
            key = f"{arm}|warmup={w}"
            rs = [by[(arm, w, sd)] for sd in seed_ids]
            cs = [by[(CONTROL, w, sd)] for sd in seed_ids]
            out["diverged"][key] = [x["diverged_at"] for x in rs]
            if any(x["diverged_at"] is not None for x in rs):
                continue
            curve = [[x["bpb"][k]["mean"] for x in rs] for k in range(len(steps))]
            out["curves"][key] = [summarize(v) for v in curve]
            out["final_bpb"][key] = summarize(curve[-1])
            st, ratio = [], []
            for t in thresholds:
                a = [steps_to(x["eval_steps"], [b["mean"] for b in x["bpb"]], t["bpb"]) for x in rs]
                c = [steps_to(x["eval_steps"], [b["mean"] for b in x["bpb"]], t["bpb"]) for x in cs]
                st.append({"threshold": t["bpb"], "steps": a, "standard_steps": c})
                ok = all(v is not None for v in a + c) and all(v > 0 for v in c)
                ratio.append(summarize([u / v for u, v in zip(a, c)]) if ok else
                             {"mean": None, "half": None,
                              "note": f"not reached: {sum(v is None for v in a)}/{len(a)} "
                                      f"seeds (standard {sum(v is None for v in c)}/{len(c)})"})
            out["steps_to_threshold"][key] = st
            out["ratio_to_standard"][key] = ratio
            gains = []
            for k in points:
                m, h, n = paired_diff_ci([x["bpb"][k]["mean"] for x in rs],
                                         [x["bpb"][k]["mean"] for x in cs])
                gains.append({"step": steps[k], "mean": m, "half": h, "verdict": verdict(m, h)})
            # does the gain fade: (final gain) - (early gain) per seed; > 0 means it shrank
            early, last = points[0], points[-1]
            fade = paired_diff_ci(
                [x["bpb"][last]["mean"] - y["bpb"][last]["mean"] for x, y in zip(rs, cs)],
                [x["bpb"][early]["mean"] - y["bpb"][early]["mean"] for x, y in zip(rs, cs)])
            out["gain_at_steps"][key] = {"points": gains, "final_minus_early": {
                "mean": fade[0], "half": fade[1]}}  # fmt: skip
            gain_curve = [paired_diff_ci([x["bpb"][k]["mean"] for x in rs],
                                         [x["bpb"][k]["mean"] for x in cs])
                          for k in range(len(steps))]  # fmt: skip
            out["curves"][key + "|gain"] = [{"mean": m, "half": h} for m, h, _ in gain_curve]
        if len(s.warmup) > 1:
            on, off = s.warmup[0], s.warmup[-1]
            a = [by[(arm, off, sd)] for sd in seed_ids]
            b = [by[(arm, on, sd)] for sd in seed_ids]
            if all(x["diverged_at"] is None for x in a + b):
                k = points[0]
                m0, h0, _ = paired_diff_ci([x["bpb"][k]["mean"] for x in a],
                                           [x["bpb"][k]["mean"] for x in b])
                m1, h1, _ = paired_diff_ci([x["bpb"][-1]["mean"] for x in a],
                                           [x["bpb"][-1]["mean"] for x in b])
                spike = [max(x["train_loss"][:max(1, len(x["train_loss"]) // 10)])
                         - x["train_loss"][0] for x in a]  # fmt: skip
                out["warmup_ablation"][arm] = {
                    "early_step": steps[k],
                    "no_minus_with_early": {"mean": m0, "half": h0, "verdict": verdict(m0, h0)},
                    "no_minus_with_final": {"mean": m1, "half": h1, "verdict": verdict(m1, h1)},
                    "max_rise_of_train_loss_first_10pct_no_warmup": spike,
                }
        # diagnostics: seed 0, warm-up on; mean over matrices (2-D) and over all tensors
        x = by[(arm, w_ref, seed_ids[0])]
        diag = {}
        for step, per in x["diagnostics"].items():
            mats = [v for v in per.values() if "top_sv" in v]
            diag[step] = {
                "w1_to_trained": sum(v["w1"] for v in per.values()) / len(per),
                "kurtosis_matrices": sum(v["kurtosis"] for v in mats) / len(mats),
                "stable_rank_matrices": sum(v["stable_rank"] for v in mats) / len(mats),
                "top_sv_matrices": sum(v["top_sv"] for v in mats) / len(mats),
                "per_tensor": per,
            }
        out["diagnostics"][arm] = diag
    return out


def classify(res: dict, arm: str) -> str:
    """Which of the issue's three outcomes this arm's ratios support (warm-up on)."""
    key = f"{arm}|warmup={res['warmup'][0]}"
    if any(d is not None for d in res["diverged"].get(key, [])):
        return "won't train (diverged)"
    rat = res["ratio_to_standard"].get(key, [])
    last = rat[-1] if rat else None
    if last is None or last.get("mean") is None:
        return "slower (late threshold not reached in every seed)"
    m, h = last["mean"], last["half"] or 0.0
    if m + h < 1.0:
        return "faster"
    if m - h > 1.0:
        return "slower"
    return "same speed (ratio's interval includes 1)"


def _plots(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = res["eval_steps"]
    names = []
    fig, axes = plt.subplots(1, len(res["warmup"]), figsize=(6 * len(res["warmup"]), 4.2),
                             sharey=True, squeeze=False)  # fmt: skip
    color = {arm: f"C{i % 10}" for i, arm in enumerate(res["arms"])}  # the same in both plots
    for ax, w in zip(axes[0], res["warmup"]):
        for arm in res["arms"]:
            c = res["curves"].get(f"{arm}|warmup={w}")
            if not c:
                continue
            m = [x["mean"] for x in c]
            h = [x["half"] or 0.0 for x in c]
            (line,) = ax.plot(steps, m, label=arm, lw=1.4, color=color[arm])
            ax.fill_between(steps, [a - b for a, b in zip(m, h)], [a + b for a, b in zip(m, h)],
                            color=line.get_color(), alpha=0.2, lw=0)  # fmt: skip
        ax.set_yscale("log")
        ax.set_title(f"warm-up {w} steps")
        ax.set_xlabel(f"step (1 step = {res['flops_per_step']:.3g} FLOPs)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out bits per byte (mean of domains)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "plots" / "bpb_vs_step.png", dpi=110)
    plt.close(fig)
    names.append("plots/bpb_vs_step.png")

    fig, axes = plt.subplots(1, len(res["warmup"]), figsize=(6 * len(res["warmup"]), 4.2),
                             sharey=True, squeeze=False)  # fmt: skip
    for ax, w in zip(axes[0], res["warmup"]):
        for arm in res["arms"]:
            c = res["curves"].get(f"{arm}|warmup={w}|gain")
            if not c or arm == CONTROL:
                continue
            m = [x["mean"] for x in c]
            h = [0.0 if x["half"] is None or math.isnan(x["half"]) else x["half"] for x in c]
            (line,) = ax.plot(steps, m, label=arm, lw=1.4, color=color[arm])
            ax.fill_between(steps, [a - b for a, b in zip(m, h)], [a + b for a, b in zip(m, h)],
                            color=line.get_color(), alpha=0.2, lw=0)  # fmt: skip
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(f"arm − standard, paired by seed (warm-up {w})")
        ax.set_xlabel("step")
        ax.set_yscale("symlog", linthresh=0.01)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Δ held-out bpb (below 0: better than standard)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "plots" / "gain_vs_step.png", dpi=110)
    plt.close(fig)
    names.append("plots/gain_vs_step.png")
    return names


def write_report(res: dict, out: Path, runs: list[dict]) -> Path:
    (out / "plots").mkdir(parents=True, exist_ok=True)
    plots = _plots(res, out)
    w_on, w_off = res["warmup"][0], res["warmup"][-1]
    src = res["source"]
    L = ["# Initialising from a trained model's weight distribution (issue 15)", ""]
    L += [f"Source: {src['steps']} steps on the train split ({src['tokens']:,} tokens, "
          f"{src['train_flops']:.3g} FLOPs); its held-out bpb {src['heldout_bpb']['mean']:.3f}. "
          f"Targets: {res['steps']} steps each at peak LR {res.get('target_lr', '-')} (the "
          f"source's: {res.get('source_lr', '-')}), seeds {res['seeds']}, warm-up "
          f"{' / '.join(map(str, res['warmup']))} steps; 1 step = {res['flops_per_step']:.3g} "
          f"training FLOPs, the same for every arm (so loss against FLOPs is loss against steps "
          f"rescaled). Held-out text: documents in the corpora's held-out split, which neither "
          f"the source nor the targets trained on. Wall time of the source and every target run "
          f"(training and evaluation, summed): {res['train_wall_s'] / 60:.1f} min.", ""]
    L += ["Arms (moe/model/init_dist.py): `standard` the default init (the control); "
          "`gaussian` N(mean, std²) per tensor; `histogram` inverse-CDF samples of each trained "
          "tensor's values; `shuffle` the trained values permuted elementwise; `spectrum` random "
          "orthonormal factors with the trained singular values (1-D tensors: histogram); "
          "`trained` the source itself (upper bound); `+emb` / `+norms`: the trained token "
          "embedding and output head / RMSNorm gains copied instead.", ""]
    L += ["Outcome per arm (warm-up on): *faster* when the interval of the step ratio at the "
          "late threshold lies below 1, *slower* above 1 or when a seed never reaches it, "
          "*same speed* when it includes 1; *won't train* when a run diverges.", ""]
    L += ["Every number: mean over seeds ± half-width of the 95% Student t interval; comparisons "
          "with `standard` are paired by seed within the same warm-up setting.", ""]
    L += ["## Answer", ""]
    for arm in res["arms"]:
        if arm != CONTROL:
            L.append(f"- `{arm}`: {classify(res, arm)}")
    L += ["", "## Steps to reach thresholds, as a ratio to `standard` (warm-up on)", ""]
    th = res["thresholds"]
    L.append("| arm | " + " | ".join(
        f"bpb ≤ {t['bpb']:.3f} (standard's worst seed at step {t['step']})" for t in th) + " |")
    L.append("|---|" + "---|" * len(th))
    for w in res["warmup"]:
        for arm in res["arms"]:
            rat = res["ratio_to_standard"].get(f"{arm}|warmup={w}")
            cells = ([_fmt(x) if x.get("mean") is not None else x.get("note", "n/a") for x in rat]
                     if rat else ["diverged"] * len(th))  # fmt: skip
            L.append(f"| {arm} (warm-up {w}) | " + " | ".join(cells) + " |")
    L += ["", "## Held-out bpb at equal steps, paired gain against `standard` (does it fade?)", ""]
    pts = None
    for g in res["gain_at_steps"].values():
        pts = [p["step"] for p in g["points"]]
        break
    if pts:
        L.append("| arm | final bpb | " + " | ".join(f"Δ at step {p}" for p in pts)
                 + " | final Δ − early Δ |")
        L.append("|---|---|" + "---|" * (len(pts) + 1))
        for w in res["warmup"]:
            for arm in res["arms"]:
                key = f"{arm}|warmup={w}"
                g = res["gain_at_steps"].get(key)
                if g is None:
                    L.append(f"| {arm} (warm-up {w}) | diverged |" + " |" * (len(pts) + 1))
                    continue
                cells = [f"{_fmt(p, 4)} ({p['verdict']})" for p in g["points"]]
                L.append(f"| {arm} (warm-up {w}) | {_fmt(res['final_bpb'][key], 4)} | "
                         + " | ".join(cells) + f" | {_fmt(g['final_minus_early'], 4)} |")
    L += ["", "A positive `final Δ − early Δ` means the gain over `standard` shrank between the "
          "early point and the end of the run.", ""]
    if res["warmup_ablation"]:
        L += [f"## Warm-up ablation: no warm-up ({w_off}) minus warm-up ({w_on}), paired", ""]
        L.append("| arm | Δ bpb early | Δ bpb final | largest rise of train loss over its "
                 "first value, first 10% of steps, no warm-up (per seed) |")
        L.append("|---|---|---|---|")
        for arm, a in res["warmup_ablation"].items():
            L.append(f"| {arm} | {_fmt(a['no_minus_with_early'], 4)} "
                     f"({a['no_minus_with_early']['verdict']}) | "
                     f"{_fmt(a['no_minus_with_final'], 4)} ({a['no_minus_with_final']['verdict']})"
                     f" | {', '.join(f'{v:.3f}' for v in a['max_rise_of_train_loss_first_10pct_no_warmup'])} |")  # noqa: E501
        L.append("")
    L += ["## Diagnostics (seed 0, warm-up on)", "",
          "Means over tensors: Wasserstein-1 distance of each tensor's values to the trained "
          "tensor's (all tensors); excess kurtosis, stable rank ‖W‖²_F/σ₁² and top singular "
          "value σ₁ (2-D tensors). Per-tensor values are in results.json.", ""]
    L.append("| arm | step | W1 to trained | kurtosis | stable rank | σ₁ |")
    L.append("|---|---|---|---|---|---|")
    for arm, diag in res["diagnostics"].items():
        for step, d in sorted(diag.items(), key=lambda kv: int(kv[0])):
            L.append(f"| {arm} | {step} | {d['w1_to_trained']:.4f} | "
                     f"{d['kurtosis_matrices']:.2f} | {d['stable_rank_matrices']:.2f} | "
                     f"{d['top_sv_matrices']:.3f} |")
    L += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(L) + "\n")
    return path
