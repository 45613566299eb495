"""The pruning measurements (issue 14), run by `moe run` from a recipe's `prune:` section.

kind: curves (recipes/prune/curves.yaml)
    Per seed, a model (the recipe's model section) trains `train_steps` steps on the corpora's
    train split. Importance scores per domain come from calibration batches of that domain's
    train split (moe/surgery/importance.py). For every unit (heads, ffn, layers), method
    (taylor, magnitude, random), scoring domain (each domain and `all`) and fraction, the model
    is pruned (moe/surgery/prune.py) and its held-out bits per byte measured on every domain:
    the curves (each domain pruned by its own scores), the 3x3 matrix "pruned with domain A's
    scores, evaluated on B" at every fraction, and, at `heal_fractions`, the same after
    `heal_steps` of healing on the scoring domain's stream (taylor only), against the unpruned
    model healed the same way (healing is training). The Jaccard overlap of
    the units each domain keeps at `matrix_fraction` (chance: keep/(2 - keep)).

kind: compress (recipes/prune/compress.yaml), "Train Large, Then Compress" (Li et al. 2020)
    Each of `sizes` trains for the same training FLOPs (the largest size's `budget_steps`
    steps; a smaller one trains proportionally more steps on the same stream), then is
    compressed at each of `levels` (structured pruning by Taylor scores over all domains,
    unstructured magnitude pruning, int8/int4) and evaluated: held-out bpb against the bytes
    its weights take (moe/surgery/quantize.py). The report gives the Pareto frontier and
    whether compressed larger models beat smaller uncompressed ones of no more bytes.

Training is `moe.experiments.init.study.train_loop` (LitLM's model, loss, AdamW and schedule, no
Trainer); each finished seed or size is saved as JSON under `<out_dir>/runs/`, so an
interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import torch

from moe.config import ConfigError, ModelConfig, Recipe
from moe.data.datamodule import DomainDataModule
from moe.eval.heldout import HeldOut
from moe.experiments import cached_run
from moe.experiments.init.study import train_loop
from moe.io.checkpoint import make_meta, save_checkpoint, write_json
from moe.model.flops import count_params, train_flops_per_token
from moe.model.transformer import Transformer
from moe.surgery import importance as imp
from moe.surgery.prune import METHODS, apply_plan, heal, plan_pruning
from moe.surgery.quantize import compress_state
from moe.surgery.structure import ffn_hidden

KINDS = ("curves", "compress")
UNITS = ("heads", "ffn", "layers")
SIZE_RE = re.compile(r"^(\d+)x(\d+)x(\d+)x(\d+)$")


def parse_size(s: str) -> dict:
    m = SIZE_RE.match(s.strip())
    if not m:
        raise ConfigError(f"prune.sizes: {s!r} is not DIMxLAYERSxHEADSxFFN (e.g. 32x2x2x96)")
    dim, layers, heads, ffn = map(int, m.groups())
    return {"dim": dim, "n_layers": layers, "n_heads": heads, "n_kv_heads": heads,
            "ffn_dim": ffn}  # fmt: skip


def parse_level(s: str) -> dict:
    """'ffn0.5+int8' -> {heads, ffn, layers, unstructured, bits}; 'fp16' = no compression."""
    out = {"heads": 0.0, "ffn": 0.0, "layers": 0, "unstructured": 0.0, "bits": 16}
    for tok in s.split("+"):
        tok = tok.strip()
        m = re.match(r"^(heads|ffn|unstructured)([0-9.]+)$|^layers(\d+)$|^int(8|4)$|^fp16$", tok)
        if not m:
            raise ConfigError(f"prune.levels: {s!r}: {tok!r} is not headsF, ffnF, layersN, "
                              "unstructuredF, int8, int4 or fp16")  # fmt: skip
        if m.group(1):
            v = float(m.group(2))
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"prune.levels: {s!r}: {tok} needs a fraction in [0, 1)")
            out[m.group(1)] = v
        elif m.group(3):
            out["layers"] = int(m.group(3))
        elif m.group(4):
            out["bits"] = int(m.group(4))
    return out


def validate(r: Recipe) -> None:
    p = r.prune
    if p.kind not in KINDS:
        raise ConfigError(f"prune.kind: {p.kind!r} is not one of {', '.join(KINDS)}")
    if p.seeds < 1 or p.calib_batches < 1 or p.eval_batches < 1:
        raise ConfigError("prune: seeds, calib_batches and eval_batches must be >= 1")
    if p.kind == "curves":
        for u in p.units:
            if u not in UNITS:
                raise ConfigError(f"prune.units: {u!r} is not one of {', '.join(UNITS)}")
        for m in p.methods:
            if m not in METHODS:
                raise ConfigError(f"prune.methods: {m!r} is not one of {', '.join(METHODS)}")
        for f in list(p.fractions) + list(p.heal_fractions) + [p.matrix_fraction]:
            if not 0.0 < f < 1.0:
                raise ConfigError(f"prune: fraction {f} must be in (0, 1)")
        if p.train_steps < 1 or p.heal_steps < 0:
            raise ConfigError("prune: train_steps must be >= 1 and heal_steps >= 0")
    else:
        if len(p.sizes) < 2 or not p.levels:
            raise ConfigError("prune.kind=compress needs at least two sizes and one level")
        size_configs(r)
        for lv in p.levels:
            parse_level(lv)
        if p.budget_steps < 1:
            raise ConfigError("prune.budget_steps must be >= 1")


# ----------------------------------------------------------------------------- helpers


def _train(r: Recipe, cfg: ModelConfig, steps: int, seed: int, dm: DomainDataModule,
           path: Path) -> tuple[Transformer, dict]:  # fmt: skip
    """Train (or load) one model on the train split; its checkpoint at `path`."""
    from moe.io.checkpoint import load_model

    if (path / "meta.json").is_file():
        loaded = load_model(path)
        return loaded.model, loaded.meta["train_info"]
    torch.manual_seed(seed)
    model = Transformer(cfg)
    tdm = DomainDataModule(r.data, seed=seed, tokenizer=dm.tokenizer)
    tdm._tokens = dm._tokens  # the same corpora; only the data order differs
    t0 = time.time()
    rec = train_loop(model, r, r.optim, steps, tdm, None, 1, [], None)
    if rec["diverged_at"] is not None:
        raise ConfigError(f"prune study: training diverged at step {rec['diverged_at']}")
    tokens = steps * r.data.batch_size * r.data.seq_len
    info = {"steps": steps, "tokens": tokens,
            "train_flops": tokens * train_flops_per_token(model.config, r.data.seq_len),
            "wall_s": time.time() - t0, "final_train_loss": rec["train_loss"][-1],
            "params": count_params(model.config).total}  # fmt: skip
    meta = make_meta(kind="dense", tokens_seen=tokens, train_flops=info["train_flops"],
                     recipe=dataclasses.asdict(dataclasses.replace(r, model=cfg)),
                     train_info=info)  # fmt: skip
    save_checkpoint(path, model.state_dict(), model.config, meta, overwrite=True,
                    tokenizer=dm.tokenizer)  # fmt: skip
    return model, info


def _scores(r: Recipe, model: Transformer, dm: DomainDataModule, seed: int) -> dict:
    names = dm.domain_names
    out = {}
    for d in r.data.domains:
        calib = imp.calibration_batches(r.data, seed, d, r.prune.calib_batches,
                                        r.data.batch_size, dm.tokenizer)  # fmt: skip
        out[d] = imp.compute_importance(model, calib, names)
    out["all"] = imp.combine({d: out[d] for d in r.data.domains}, "all")
    return out


# ----------------------------------------------------------------------------- curves


def _curve_points(unit: str, fractions: list[float], cfg: ModelConfig) -> list[tuple]:
    """(argument to plan_pruning, fraction removed) per distinct point: each fraction rounded
    to whole units (key/value groups, neurons, layers), 1 to n - 1 of them."""
    n = {"heads": cfg.n_kv_heads, "ffn": ffn_hidden(cfg), "layers": cfg.n_layers}[unit]
    counts = sorted({min(n - 1, max(1, round(f * n))) for f in fractions})
    return [(c if unit == "layers" else c / n, c / n) for c in counts]


def _prune_eval(model, cfg, scores, unit, x, method, seed, heldout):
    kw = {"heads": 0.0, "ffn": 0.0, "layers": 0}
    kw[unit] = x
    try:
        plan = plan_pruning(cfg, scores, method=method, seed=seed, **kw)
    except ConfigError:
        return None, None  # every unit of a layer would go: not a point of the curve
    c2, sd2 = apply_plan(cfg, model.state_dict(), plan)
    pruned = Transformer.from_state(c2, sd2).eval()
    return pruned, heldout.bpb(pruned)


def _curves_seed(r: Recipe, seed: int, dm: DomainDataModule, heldout: HeldOut, out: Path) -> dict:
    p = r.prune
    t0 = time.time()
    model, info = _train(r, r.model, p.train_steps, seed, dm, out / "models" / f"seed{seed}")
    model.eval()
    cfg = model.config
    base = heldout.bpb(model)
    scores = _scores(r, model, dm, seed)
    domains = list(r.data.domains)
    rows = []
    # healing trains: its reference is the unpruned model healed the same way (same steps,
    # stream and data order), so a healed point's loss is the pruning's cost after healing
    base_healed = {}
    if p.heal_steps and "taylor" in p.methods:
        for by in ["all"] + domains:
            ref = Transformer.from_state(cfg, model.state_dict()).eval()
            heal(ref, r.data, seed + 77, p.heal_steps, p.heal_lr, None if by == "all" else by,
                 dm.tokenizer, progress=False)  # fmt: skip
            base_healed[by] = heldout.bpb(ref)
    for unit in p.units:
        pts = _curve_points(unit, list(p.fractions), cfg)
        # healing at the point nearest each heal fraction
        heal_at = {min(pts, key=lambda q: abs(q[1] - t))[1] for t in p.heal_fractions}
        for x, frac in pts:
            for method in p.methods:
                for by in (["all"] + domains) if method != "random" else ["all"]:
                    sc = scores[by] if method != "random" else None
                    pruned, bpb = _prune_eval(model, cfg, sc, unit, x, method, seed, heldout)
                    if pruned is None:
                        continue
                    row = {"unit": unit, "method": method, "by": by, "x": x, "frac": frac,
                           "params": count_params(pruned.config).total, "bpb": bpb,
                           "healed": False}  # fmt: skip
                    rows.append(row)
                    if p.heal_steps and method == "taylor" and frac in heal_at:
                        heal(pruned, r.data, seed + 77, p.heal_steps, p.heal_lr,
                             None if by == "all" else by, dm.tokenizer, progress=False)
                        rows.append({**row, "bpb": heldout.bpb(pruned), "healed": True})
    # the units each domain keeps at the matrix fraction, and their overlap
    keep = 1.0 - p.matrix_fraction
    jac = {}
    for name in ("kv.taylor", "kv.magnitude", "ffn.taylor", "ffn.magnitude"):
        sets = {d: imp.kept_sets(scores[d][name], keep) for d in domains}
        jac[name] = {f"{a}|{b}": imp.jaccard(sets[a], sets[b])
                     for i, a in enumerate(domains) for b in domains[i + 1:]}  # fmt: skip
    infl = {d: scores[d]["layers.influence"].tolist() for d in domains + ["all"]}
    return {"seed": seed, "base": base, "base_healed": base_healed, "rows": rows,
            "jaccard": jac, "influence": infl,
            "train": info, "wall_s": time.time() - t0,
            "params": count_params(cfg).total}  # fmt: skip


# ----------------------------------------------------------------------------- compress


def size_configs(r: Recipe) -> list[tuple[str, ModelConfig]]:
    return [(s, dataclasses.replace(r.model, **parse_size(s)).resolved()) for s in r.prune.sizes]


def budget(r: Recipe) -> dict:
    """Every size's steps at the FLOPs the largest spends in budget_steps."""
    per_step = {s: r.data.batch_size * r.data.seq_len * train_flops_per_token(c, r.data.seq_len)
                for s, c in size_configs(r)}  # fmt: skip
    largest = max(per_step, key=per_step.get)
    flops = r.prune.budget_steps * per_step[largest]
    steps = {s: max(1, round(flops / f)) for s, f in per_step.items()}
    return {"flops": flops, "largest": largest, "steps": steps, "flops_per_step": per_step}


def _compress_run(r: Recipe, size: str, cfg: ModelConfig, steps: int, seed: int,
                  dm: DomainDataModule, heldout: HeldOut, out: Path) -> dict:  # fmt: skip
    t0 = time.time()
    model, info = _train(r, cfg, steps, seed, dm, out / "models" / f"{size}-seed{seed}")
    model.eval()
    scores = None
    points = []
    for level in r.prune.levels:
        lv = parse_level(level)
        sd, c2 = model.state_dict(), model.config
        if lv["heads"] or lv["ffn"] or lv["layers"]:
            if scores is None:
                scores = _scores(r, model, dm, seed)["all"]
            try:
                plan = plan_pruning(model.config, scores, lv["heads"], lv["ffn"], lv["layers"],
                                    "taylor", seed)  # fmt: skip
            except ConfigError as e:
                points.append({"level": level, "skipped": str(e)})
                continue
            c2, sd = apply_plan(model.config, sd, plan)
        sd, comp = compress_state(c2, sd, lv["unstructured"], lv["bits"])
        m2 = Transformer.from_state(c2, sd).eval()
        points.append({"level": level, "bytes": comp["bytes"], "params": comp["params"],
                       "bpb": heldout.bpb(m2)})  # fmt: skip
    return {"size": size, "seed": seed, "steps": steps, "train": info, "points": points,
            "wall_s": time.time() - t0}  # fmt: skip


# ----------------------------------------------------------------------------- entry points


def plan(r: Recipe, seeds: int | None = None) -> str:
    validate(r)
    p = r.prune
    n = p.seeds if seeds is None else seeds
    if n < 1:  # as the run refuses it
        raise ConfigError("--seeds must be at least 1")
    if p.kind == "curves":
        return (f"prune curves {r.name}: {n} seeds x a model trained {p.train_steps} steps; "
                f"units {', '.join(p.units)} x methods {', '.join(p.methods)} x fractions "
                f"{p.fractions} x scoring domain (each, all); healing {p.heal_steps} steps at "
                f"{p.heal_fractions}")  # fmt: skip
    b = budget(r)
    steps = ", ".join(f"{s}: {k} steps" for s, k in b["steps"].items())
    return (f"prune compress {r.name}: {n} seeds x sizes at {b['flops']:.3g} training FLOPs "
            f"({steps}); levels {', '.join(p.levels)}")  # fmt: skip


def run(r: Recipe, seeds: int | None = None, recipe_path: str | None = None) -> Path:
    validate(r)
    p = r.prune
    n = p.seeds if seeds is None else seeds
    if n < 1:
        raise ConfigError("--seeds must be at least 1")
    out = Path(r.out_dir)  # emptied by --overwrite in moe.experiments.experiment_dir
    (out / "runs").mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    dm = DomainDataModule(r.data, seed=r.seed)
    dm.setup()
    heldout = HeldOut(dm, list(r.data.domains), p.eval_batches, r.eval.batch_size)
    runs = []
    from moe.experiments.prune import report as prune_report

    if p.kind == "curves":
        for i in range(n):
            seed = r.seed + i
            runs.append(cached_run(out, f"curves-seed{seed}",
                                   lambda seed=seed: _curves_seed(r, seed, dm, heldout, out),
                                   "prune curves"))  # fmt: skip
        results = prune_report.summarise_curves(runs, r)
    else:
        b = budget(r)
        for i in range(n):
            seed = r.seed + i
            for size, cfg in size_configs(r):
                runs.append(cached_run(
                    out, f"compress-{size}-seed{seed}",
                    lambda size=size, cfg=cfg, seed=seed: _compress_run(
                        r, size, cfg, b["steps"][size], seed, dm, heldout, out),
                    "prune compress"))  # fmt: skip
        results = prune_report.summarise_compress(runs, r, b)
    results["wall_s"] = time.time() - t_start  # this invocation's (a resumed one: less)
    results["total_wall_s"] = sum(x["wall_s"] for x in runs)
    results["recipe"] = recipe_path
    write_json(out / "results.json", results)
    return prune_report.write_report(results, out)
