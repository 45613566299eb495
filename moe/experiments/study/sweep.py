"""`moe sweep`: one study per value of a recipe key, and one report of the gains across them.

    moe sweep recipes/sweep.yaml                             # the recipe's `sweep:` block
    moe sweep recipes/study.yaml study.budget_steps=100,200,400,800 --seeds 3

Each value's study runs (and resumes) in `<out_dir>/<key>=<value>/` like `moe run`; the sweep
report gives, per domain, every arm's gain over the compute-matched monolith (paired by seed,
mean and 95% interval) against the swept value, with verdicts Holm-corrected across the whole
sweep, and names the crossover where the sign changes.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from moe.config import ConfigError, Recipe, load_recipe, to_dict
from moe.eval.stats import verdict
from moe.experiments.study.context import log
from moe.io.checkpoint import write_json
from moe.io.output import claim, recipe_inputs


def split_sweep_override(overrides: list[str]) -> tuple[list[str], tuple[str, list[str]] | None]:
    """Pick the one `key=v1,v2,...` override (a comma outside brackets) from plain overrides."""
    plain, sweep = [], None
    for ov in overrides:
        key, _, value = ov.partition("=")
        depth, comma = 0, False
        for ch in value:
            depth += ch in "[{("
            depth -= ch in "]})"
            comma |= ch == "," and depth == 0
        if not comma:
            plain.append(ov)
            continue
        if sweep is not None:
            raise ConfigError(f"moe sweep takes one swept key; got {sweep[0]} and {key}")
        sweep = (key, [v.strip() for v in value.split(",")])
    return plain, sweep


def _value_dict(value: str) -> dict | None:
    """A swept value that sets several keys at once (a mapping, e.g. a model size:
    {dim: 64, ffn_dim: 192}), else None."""
    try:
        got = json.loads(value)
    except (TypeError, ValueError):
        return None
    return got if isinstance(got, dict) else None


def _value_overrides(key: str, value: str) -> list[str]:
    """The recipe overrides one swept value makes: `key=value`, or for a mapping one per entry,
    each `key.entry=v` (`key` "." sweeps keys of the whole recipe: {model.dim: 64,
    study.budget_flops: 4e12} grows a model with its budget)."""
    d = _value_dict(value)
    if d is None:
        return [f"{key}={value}"]
    pre = "" if key == "." else f"{key}."
    return [f"{pre}{k}={_as_override(v)}" for k, v in d.items()]


def value_label(value: str) -> str:
    """How a swept value is shown: a mapping as `k=v, k=v`, anything else as given."""
    d = _value_dict(value)
    return value if d is None else ", ".join(f"{k}={_short(v)}" for k, v in d.items())


def _short(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _value_dir(key: str, value: Any) -> str:
    d = _value_dict(str(value))
    if d is not None:  # model={dim: 64, ffn_dim: 192} -> model=dim64_ffn_dim192
        head = "" if key == "." else f"{key.rsplit('.', 1)[-1]}="
        return head + "_".join(f"{k.rsplit('.', 1)[-1]}{_short(v)}" for k, v in d.items())
    return f"{key.rsplit('.', 1)[-1]}={value}"


class Sweep:
    def __init__(self, recipe_path: str | None, overrides: list[str], seeds: int | None = None,
                 overwrite: bool = False, jobs: int = 1):
        plain, spec = split_sweep_override(list(overrides))
        base = load_recipe(recipe_path, plain)
        from moe.experiments import experiment_of

        exp = experiment_of(base)
        if exp is not None:  # its section would be ignored: each value would run a study
            raise ConfigError(
                f"moe sweep runs the specialization study; {recipe_path or 'this recipe'} is a "
                f"{exp.section} experiment: run `moe run` once per value with its own out_dir"
            )
        if spec is None:
            if base.sweep.key is None or not base.sweep.values:
                raise ConfigError(
                    "nothing to sweep: give key=v1,v2,... or a `sweep:` block (key, values) in "
                    "the recipe"
                )
            spec = (base.sweep.key, [_as_override(v) for v in base.sweep.values])
            self.from_recipe = True
        key, values = spec
        self.from_recipe = getattr(self, "from_recipe", False)
        if len(values) < 2:
            raise ConfigError(f"sweep {key}: give at least two values")
        if len(set(values)) != len(values):
            raise ConfigError(f"sweep {key}: a value is listed twice")
        self.key, self.values = key, values
        self.labels = list(base.sweep.labels) if self.from_recipe else []
        if self.labels and len(self.labels) != len(values):
            raise ConfigError(f"sweep.labels: {len(self.labels)} labels for {len(values)} values")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError("sweep.labels: a label is listed twice")
        self.seeds = base.study.seeds if seeds is None else seeds
        if self.seeds < 1:
            raise ConfigError(f"--seeds must be at least 1, got {self.seeds}")
        self.base = base
        self.run_dir = Path(base.out_dir)
        self.recipe_path = recipe_path
        self.overwrite = overwrite or base.overwrite
        self.jobs = jobs  # each value's seeds (or training stages) in up to N processes
        # every value's recipe loads (and its study plans) before anything trains
        self.recipes: list[Recipe] = []
        for v in values:
            where = f"sweep {key}={v}"
            sets = _value_overrides(key, v)
            try:
                r = load_recipe(recipe_path, [*plain, *sets, "sweep.key=null",
                                              "sweep.values=[]", "sweep.labels=[]"])
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            known = _flat_keys(to_dict(r))
            for k in [s.partition("=")[0] for s in sets]:
                if k not in known:
                    raise ConfigError(f"{where}: {k!r} is not a recipe key")
            r = _with_out_dir(r, str(self.run_dir / _value_dir(key, v)), self.overwrite)
            from moe.experiments.study import check_study

            try:
                check_study(r, seeds=self.seeds)  # what each value's run_study checks first
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            self.recipes.append(r)

    def identity(self) -> dict:
        rec = to_dict(self.base)
        for k in ("overwrite", "out_dir", "name", "sweep"):
            rec.pop(k, None)
        rec.get("trainer", {}).pop("enable_progress_bar", None)
        rec.get("study", {}).pop("seeds", None)
        return {"key": self.key, "values": self.values, "recipe": rec}

    def plan(self) -> str:
        from moe.experiments.study.runner import Study

        over = "; ".join(self.labels or [value_label(v) for v in self.values])
        lines = [f"sweep {self.key} over {over} ({self.seeds} seed(s) each) "
                 f"into {self.run_dir}"]
        for r in self.recipes:
            lines.append(Study(r, Path(r.out_dir)).describe_plan())
        return "\n".join(lines)

    def run(self) -> Path:
        from moe.experiments.study import run_study

        # the sweep's claim is held to its report: a second sweep into the same directory is
        # refused, not run alongside (each value's study also claims its own directory)
        with claim(self.run_dir, recipe_inputs(self.base)):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            marker = self.run_dir / "sweep.json"
            ident = self.identity()
            if marker.is_file() and not self.overwrite:
                old = json.loads(marker.read_text())
                if json.dumps(old, sort_keys=True) != json.dumps(ident, sort_keys=True):
                    raise ConfigError(
                        f"{self.run_dir} holds a different sweep; pass --overwrite to replace "
                        "it or choose another out_dir"
                    )
            write_json(marker, ident)
            per_value = []
            for i, (v, r) in enumerate(zip(self.values, self.recipes), 1):
                log(f"=== sweep {self.key}={v} ({i}/{len(self.values)})")
                run_study(r, seeds=self.seeds, recipe_path=self.recipe_path, jobs=self.jobs)
                per_value.append(self._seed_results(Path(r.out_dir)))
            from moe.experiments.study.report import aggregate

            # one Holm correction spans every value: each value's bootstrap resolves for all
            aggs = [aggregate(res, family=len(per_value)) for res in per_value]
            summary = summarize(self.key, self.values, aggs, self.labels)
            swept = "" if self.from_recipe else f" {self.key}={','.join(self.values)}"
            summary["command"] = (
                f"moe sweep {self.recipe_path or ''}{swept} --seeds {self.seeds}"
            )
            write_json(self.run_dir / "results.json", summary)
            from moe.experiments.study.report.sweep import write_sweep_report

            path = write_sweep_report(summary, self.run_dir)
            log(f"wrote {path}")
            return path

    def _seed_results(self, value_dir: Path) -> list[dict]:
        if self.seeds == 1:
            return [json.loads((value_dir / "results.json").read_text())]
        seeds = [self.base.seed + k for k in range(self.seeds)]
        return [json.loads((value_dir / f"seed-{s}" / "results.json").read_text()) for s in seeds]


def _as_override(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _flat_keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _flat_keys(v, prefix + k + ".")
    return out


def _with_out_dir(r: Recipe, out_dir: str, overwrite: bool) -> Recipe:
    import dataclasses

    return dataclasses.replace(r, out_dir=out_dir, overwrite=overwrite)


def summarize(key: str, values: list[str], aggs: list[dict],
              labels: list[str] | None = None) -> dict:
    """Per arm and domain: the gain over the reference at each value, and any crossover.
    `labels` (sweep.labels) name the values in the report; by default each value itself."""
    doms = aggs[0]["domains"]
    arms: list[str] = []
    for a in aggs:
        arms += [lb for lb in a.get("gains", {}) if lb not in arms]
    from moe.experiments.study.report.verdicts import MARGIN, holm_verdicts

    gains = [copy.deepcopy(a.get("gains") or {}) for a in aggs]
    # every verdict of the sweep is one family: Holm across all values, arms and domains
    comparisons = holm_verdicts([(g, a.get("equivalence_margin", MARGIN))
                                 for g, a in zip(gains, aggs)], aggs[0].get("alpha", 0.05))
    shown = list(labels) if labels else [value_label(v) for v in values]
    points = []
    for v, a, g in zip(shown, aggs, gains):
        ref = a.get("reference_arm")
        ref_model = (a.get("arms") or {}).get(ref)
        m = (a.get("models") or {}).get(ref_model) or {}
        points.append({"value": v, "monolith_flops": m.get("train_flops"),
                       "reference": _reference_cell(m, doms),
                       "budget": a.get("budget"), "n": a.get("n"),
                       "gains": g,
                       "epochs": {lb: (a["models"].get(name) or {}).get("epochs_by_domain")
                                  for lb, name in (a.get("arms") or {}).items()}})
    return {"key": key, "values": shown, "settings": [value_label(v) for v in values],
            "domains": doms, "arms": arms,
            "reference_arm": aggs[0].get("reference_arm"),
            "experts_arm": aggs[0].get("experts_arm"), "points": points,
            "crossovers": crossovers_of(points, arms, doms), "level": aggs[0].get("level", 0.95),
            "equivalence_margin": aggs[0].get("equivalence_margin", MARGIN),
            "comparisons": comparisons}


def crossovers_of(points: list[dict], arms: list[str], doms: list[str]) -> dict[str, dict]:
    """Per arm and domain (and the mean), where the gain's sign changes along the points."""
    out: dict[str, dict[str, Any]] = {}
    for lb in arms:
        out[lb] = {}
        for d in [*doms, "mean"]:
            series = []
            for p in points:
                g = (p["gains"].get(lb) or {}).get(d) or {}
                delta = g.get("delta") or {}
                series.append((p["value"], delta.get("mean"), delta.get("half"),
                               g.get("verdict")))
            out[lb][d] = crossover(series)
    return out


def relabel(summary: dict, labels: list[str]) -> dict:
    """A finished sweep's summary with its values shown under new labels (crossovers re-named)."""
    if len(labels) != len(summary["points"]):
        raise ConfigError(f"{len(labels)} labels for {len(summary['points'])} swept values")
    out = copy.deepcopy(summary)
    out.setdefault("settings", list(summary["values"]))
    out["values"] = list(labels)
    for p, lb in zip(out["points"], labels):
        p["value"] = lb
    out["crossovers"] = crossovers_of(out["points"], out["arms"], out["domains"])
    return out


def _reference_cell(m: dict, doms: list[str]) -> dict:
    """The reference (compute-matched monolith) itself at one value: its size, tokens and
    bpb per domain and mean (mean and interval over seeds): a size sweep at fixed FLOPs reads
    its compute-optimal size from these."""
    if not m:
        return {}
    bpb = {d: (m.get("bpb") or {}).get(d) for d in doms}
    bpb["mean"] = m.get("bpb_mean")
    params = m.get("total_params")
    tokens = m.get("tokens")
    return {"total_params": params, "tokens": tokens,
            "tokens_per_param": tokens / params if params and tokens else None,
            "epochs": m.get("epochs_by_domain"), "bpb": bpb}


def best_value(points: list[dict]) -> int | None:
    """Index of the value whose reference has the lowest mean bpb (None when unknown)."""
    best, at = None, None
    for i, p in enumerate(points):
        m = (((p.get("reference") or {}).get("bpb") or {}).get("mean") or {}).get("mean")
        if m is not None and not math.isnan(m) and (best is None or m < best):
            best, at = m, i
    return at


def crossover(series: list[tuple]) -> dict[str, Any]:
    """Where an arm's gain (arm − reference; negative = the arm is better) changes sign.

    series: (value, mean gain, CI half-width[, verdict]) per value. Returns {"between": [v_i, v_j]
    or None, "verdicts": [...], "summary": text}. A crossover is named only between consecutive
    values whose mean gains have opposite signs; it is called "significant" when both ends'
    verdicts say the arm wins or loses: the given verdicts (the sweep's, Holm-corrected across
    it), else, for results without them, the t interval's at its level, uncorrected.
    """
    corrected = all(len(s) > 3 for s in series)
    if corrected:
        verdicts = [s[3] if s[1] is not None and not math.isnan(s[1]) else None for s in series]
    else:
        verdicts = [verdict(s[1], s[2]) if s[1] is not None and not math.isnan(s[1]) else None
                    for s in series]
    signs = [None if s[1] is None else (s[1] < 0) for s in series]
    out: dict[str, Any] = {"between": None, "significant": False, "verdicts": verdicts}
    for i in range(len(series) - 1):
        a, b = signs[i], signs[i + 1]
        if a is None or b is None or a == b:
            continue
        sig = all(str(v).startswith(("beats", "wins", "loses")) for v in verdicts[i:i + 2])
        out.update(between=[series[i][0], series[i + 1][0]], significant=sig,
                   direction="the arm starts winning" if b else "the arm stops winning")
        break
    if out["between"] is None:
        known = [s for s in signs if s is not None]
        if known and all(known):
            out["summary"] = "no crossover in range: the arm is ahead at every value"
        elif known and not any(known):
            out["summary"] = "no crossover in range: the arm is behind at every value"
        else:
            out["summary"] = "no crossover in range"
    else:
        lo, hi = out["between"]
        how = "after Holm correction" if corrected else "at 95%"
        out["summary"] = (f"crossover between {lo} and {hi} ({out['direction']}; "
                          + ("both" if out["significant"] else "not both")
                          + f" ends distinguishable {how})")
    return out


def run_sweep(recipe_path: str | None, overrides: list[str], seeds: int | None = None,
              overwrite: bool = False, dry_run: bool = False, jobs: int = 1) -> Path | str:
    sw = Sweep(recipe_path, overrides, seeds=seeds, overwrite=overwrite, jobs=jobs)
    if dry_run:
        return sw.plan()
    return sw.run()
