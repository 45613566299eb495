"""The shrink measurement (`surgery.kind: shrink`, see moe/experiments/surgery/study.py).

Per seed a model trains `steps`. For each axis of `axes` and fraction of `fractions` it is cut
by `moe shrink`'s own code (moe/surgery/shrink.py): `layers` deletes the layers of lowest Block
Influence on train-split calibration batches of every domain; `ffn`, `heads` and `channels`
remove that fraction of FFN neurons / key/value head groups / model-dim channels by weight
magnitude. Held-out bpb per domain right after the cut and after `heal_steps` of training (a
fresh optimiser with `warmup_steps` of warm-up); the uncut model trained the same `heal_steps`
is the control, so the healed cut's loss is compared with equal extra training.
"""

from __future__ import annotations

import math

from moe.config import ConfigError, Recipe
from moe.surgery.shrink import ShrinkSpec, block_influence_of, shrink_state

AXES = ("layers", "ffn", "heads", "channels")


def check(r: Recipe) -> None:
    s = r.surgery
    bad = [a for a in s.axes if a not in AXES]
    if not s.axes or bad:
        raise ConfigError(f"surgery shrink: axes must list some of {', '.join(AXES)}"
                          + (f"; {bad[0]!r} is not one" if bad else ""))  # fmt: skip
    if not s.fractions or any(not 0.0 < f < 1.0 for f in s.fractions):
        raise ConfigError("surgery shrink: fractions must be in (0, 1)")
    if s.heal_steps < 1:
        raise ConfigError("surgery shrink: heal_steps must be >= 1")


def plan(r: Recipe, n: int) -> str:
    s = r.surgery
    k = len(s.axes) * len(s.fractions)
    return (f"surgery shrink {r.name}: per seed ({n}) a model {s.steps} steps, {k} cuts "
            f"({', '.join(s.axes)} x {s.fractions}), each healed {s.heal_steps} steps, and the "
            f"uncut model trained {s.heal_steps} more steps")  # fmt: skip


def spec_of(axis: str, frac: float, n_layers: int) -> ShrinkSpec:
    if axis == "layers":
        return ShrinkSpec(bi_layers=min(n_layers - 1, max(1, round(frac * n_layers))))
    return ShrinkSpec(**{axis: frac})


def run_shrink(ctx, seeds: list[int]) -> dict:
    from moe.model.flops import count_params
    from moe.model.transformer import Transformer

    s = ctx.s
    cfg = ctx.r.model.resolved()
    total = count_params(cfg).total
    runs: dict = {}
    for seed in seeds:
        model = ctx.trained(f"model-seed{seed}", cfg, s.steps, seed)
        sd = model.state_dict()

        def healed(m, seed=seed) -> dict:
            ctx.train(m, s.heal_steps, seed + 7919, None, warmup=s.warmup_steps, lr=s.heal_lr)
            return ctx.heldout.bpb(m)

        rec = {"base": ctx.cached(f"base-seed{seed}", lambda m=model: {"bpb": ctx.heldout.bpb(m)}),
               "control": ctx.cached(f"control-seed{seed}", lambda sd=sd: {
                   "bpb": healed(Transformer.from_state(cfg, sd))}), "cuts": {}}  # fmt: skip
        bi = None
        for axis in s.axes:
            for frac in s.fractions:

                def cut(axis=axis, frac=frac, seed=seed, model=model, sd=sd) -> dict:
                    nonlocal bi
                    if axis == "layers" and bi is None:
                        bi = block_influence_of(model, ctx.r.data, ctx.dm.tokenizer, seed, "all",
                                                4, ctx.r.eval.batch_size)  # fmt: skip
                    c2, sd2, removed = shrink_state(cfg, sd, spec_of(axis, frac, cfg.n_layers), bi)
                    m = Transformer.from_state(c2, sd2)
                    kept = count_params(c2).total
                    return {"cut": ctx.heldout.bpb(m), "healed": healed(m), "params": kept,
                            "params_fraction": kept / total, "removed": removed}  # fmt: skip

                rec["cuts"][f"{axis}:{frac}"] = ctx.cached(f"{axis}-{frac}-seed{seed}", cut)
        runs[str(seed)] = rec
    return {"n_layers": cfg.n_layers, "params": total, "axes": list(s.axes),
            "heal_lr": s.heal_lr if s.heal_lr is not None else ctx.r.optim.lr,
            "fractions": list(s.fractions), "heal_steps": s.heal_steps, "runs": runs}  # fmt: skip


def shrink_section(res: dict, out) -> list[str]:
    from moe.experiments.surgery.report import _plt, ci, fmt, pci

    seeds = [str(x) for x in res["seeds"]]
    runs = res["runs"]
    doms = [*res["domains"], "mean"]
    base = {d: ci([runs[x]["base"]["bpb"][d] for x in seeds]) for d in doms}
    ctrl = {d: ci([runs[x]["control"]["bpb"][d] for x in seeds]) for d in doms}
    rows, summary = [], {}
    for axis in res["axes"]:
        for frac in res["fractions"]:
            k = f"{axis}:{frac}"
            cs = [runs[x]["cuts"][k] for x in seeds]
            d = {
                "params_fraction": ci([c["params_fraction"] for c in cs]),
                "cut": {m: pci([c["cut"][m] for c in cs],
                               [runs[x]["base"]["bpb"][m] for x in seeds]) for m in doms},
                "healed": {m: pci([c["healed"][m] for c in cs],
                                  [runs[x]["control"]["bpb"][m] for x in seeds]) for m in doms},
            }  # fmt: skip
            summary[k] = d
            rows.append(f"| {axis} | {frac:g} | {fmt(d['params_fraction'])} | "
                        + " | ".join(fmt(d["cut"][m]) for m in doms) + " | "
                        + " | ".join(fmt(d["healed"][m]) for m in doms) + " |")  # fmt: skip
    res["summary"] = {"base": base, "control": ctrl, "cuts": summary}
    L = ["## Shrink: bpb against the share removed, before and after healing", ""]
    L += [f"Uncut model ({res['n_layers']} layers, {res['params']:,} parameters) held-out bpb: "
          + ", ".join(f"{m} {fmt(base[m])}" for m in doms) + f". The control (uncut, "
          f"{res['heal_steps']} more steps): " + ", ".join(f"{m} {fmt(ctrl[m])}" for m in doms)
          + ". *cut*: Δ bpb of the cut model against the uncut one; *healed*: Δ bpb after "
          f"{res['heal_steps']} steps of training at peak LR {res.get('heal_lr', '-')} against "
          "the control (equal extra training), "
          "paired by seed. `layers` removes the lowest-Block-Influence layers; `ffn`, `heads`, "
          "`channels` the smallest-magnitude units.", ""]  # fmt: skip
    L += ["| axis | fraction | params kept | " + " | ".join(f"cut: {m}" for m in doms) + " | "
          + " | ".join(f"healed: {m}" for m in doms) + " |",
          "|---" * (3 + 2 * len(doms)) + "|", *rows, "",
          "![bpb against the fraction removed](plots/shrink.png)", ""]  # fmt: skip
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, axis in enumerate(res["axes"]):
        fr = res["fractions"]
        for kind, ls in (("cut", "--"), ("healed", "-")):
            ref = base if kind == "cut" else ctrl
            ys = [ref["mean"]["mean"] + summary[f"{axis}:{f}"][kind]["mean"]["mean"] for f in fr]
            hs = [summary[f"{axis}:{f}"][kind]["mean"]["half"] or 0.0 for f in fr]
            ax.errorbar(fr, ys, yerr=[0 if math.isnan(h) else h for h in hs], ls=ls, marker="o",
                        color=f"C{i}", capsize=3, label=f"{axis} ({kind})")  # fmt: skip
    ax.axhline(base["mean"]["mean"], color="k", lw=0.8, ls="--", label="uncut")
    ax.axhline(ctrl["mean"]["mean"], color="k", lw=0.8, label="uncut + healing steps")
    ax.set_xlabel("fraction of the axis removed")
    ax.set_ylabel("held-out bpb (mean of domains)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "plots" / "shrink.png", dpi=110)
    plt.close(fig)
    return L
