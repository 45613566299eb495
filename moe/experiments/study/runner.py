"""`moe run`: one study into one run directory, its stages ordered from the arms' declarations.

    seed ──fork──▶ branch-<domain> (one stream each) ─┬─▶ BTM ensemble, parameter average
      │                    └ family: fine-tunes ─merge─┘─▶ BTX MoE ─fine-tune─▶ experts
      └──continued (same run) to the budget────────────────▶ monolith (the reference)
    every model × every domain ─▶ results.json ─▶ report.md + plots/

Each stage writes `stages/<name>/` (a training run directory or a checkpoint under `model/`).
A finished stage is never redone; a killed one resumes from its last Lightning checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moe.config import ConfigError, Recipe
from moe.data.datamodule import DomainDataModule
from moe.eval.evaluate import evaluate_model
from moe.experiments.study.arms import ARMS, ModelSpec, StageSpec, get_arm, with_requirements
from moe.experiments.study.arms.monolith import REFERENCE_LABEL
from moe.experiments.study.budget import plan_budget
from moe.experiments.study.check import check_recipe
from moe.experiments.study.context import StudyContext, log
from moe.experiments.study.records import ModelResult, StageRecord, StudyResult
from moe.io.checkpoint import load_model, read_config, write_json
from moe.model.flops import count_params
from moe.model.transformer import Transformer


def fmt_s(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def check_fork_point(recipe: Recipe, seed_steps: int, total: int) -> None:
    from moe.train.schedule import wsd_decay_start

    o = recipe.optim
    if recipe.study.protocol != "fork" or o.schedule != "wsd":
        return
    start = wsd_decay_start(o, total)
    if seed_steps > start:
        raise ConfigError(
            f"study.seed_fraction={recipe.study.seed_fraction}: the fork point (step "
            f"{seed_steps}) is inside the monolith's cool-down (from step {start} of {total}); "
            "lower study.seed_fraction or optim.decay_fraction"
        )


class Study:
    def __init__(self, recipe: Recipe, run_dir: Path):
        check_recipe(recipe, recipe.name)
        self.r = recipe
        arms = with_requirements(list(recipe.study.arms))
        budget = plan_budget(recipe, arms)
        check_fork_point(recipe, budget.seed_steps, budget.total_steps)
        self.ctx = StudyContext(recipe, run_dir, budget, arms)
        self.arms = [get_arm(a) for a in arms]
        self.eval_data = parse_eval_sets(recipe.study.eval_data)

    # ------------------------------------------------------------------ the plan

    def plan(self) -> list[StageSpec]:
        """Every stage of the chosen arms, in an order where dependencies come first."""
        specs: dict[str, StageSpec] = {}
        for arm in self.arms:
            for st in arm.stages(self.ctx):
                specs.setdefault(st.name, st)
        ordered: list[StageSpec] = []
        state: dict[str, int] = {}

        def visit(n: str, via: str) -> None:
            if n not in specs:
                raise ConfigError(f"stage {via} needs stage {n}, which no chosen arm builds")
            if state.get(n) == 1:
                raise ConfigError(f"stage dependencies form a cycle at {n}")
            if state.get(n) == 2:
                return
            state[n] = 1
            for d in specs[n].deps:
                visit(d, n)
            state[n] = 2
            ordered.append(specs[n])

        for n in specs:
            visit(n, n)
        return ordered

    def model_specs(self) -> list[ModelSpec]:
        out = []
        for arm in self.arms:
            out += arm.models(self.ctx)
        return out

    def arm_order(self) -> dict[str, int]:
        """Each row label of the report's answer table with its arm's `order`: the experts
        first, the reference next, the controls, the seed last."""
        return {m.label: arm.order for arm in self.arms for m in arm.models(self.ctx) if m.label}

    def upstream(self, name: str) -> set[str]:
        specs = {s.name: s for s in self.plan()}
        seen: set[str] = set()
        todo = list(specs[name].deps)
        while todo:
            d = todo.pop()
            if d not in seen:
                seen.add(d)
                todo += specs[d].deps
        return seen

    def describe_plan(self) -> str:
        b = self.ctx.budget
        lines = [
            f"study {self.r.name}: protocol={self.r.study.protocol}, arms "
            f"{', '.join(a.name for a in self.arms)}",
            f"budget: {b.total_steps} steps x {b.tokens_per_step} tokens (monolith); seed "
            f"{b.seed_steps}, branches {b.n_branches} x {b.branch_steps}, fine-tunes "
            f"{b.n_finetunes} x {b.finetune_steps}, MoE fine-tune {b.moe_steps}; experts' "
            f"post-seed FLOPs / monolith's = "
            f"{b.expert_flops_after_seed / max(b.monolith_flops_after_seed, 1):.3f}",
        ]
        for i, st in enumerate(self.plan(), 1):
            deps = f" <- {', '.join(st.deps)}" if st.deps else ""
            steps = f" {st.steps} steps" if st.steps else ""
            lines.append(f"  {i:2d}. {st.name} [{st.kind}{steps}]{deps}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ running

    def check_stage(self, only: str | None) -> list[str]:
        """Every stage name (the planned ones, then eval and report); refuses an `only` (--stage)
        that is none of them."""
        names = [st.name for st in self.plan()] + ["eval", "report"]
        if only is not None and only not in names:
            raise ConfigError(f"--stage {only!r} is not a stage of this study: {', '.join(names)}")
        return names

    def run(self, only: str | None = None, *, quiet_later: bool = False) -> dict:
        """Run (or resume) every stage, then evaluate; `only`: that one stage (re-run when
        finished). `quiet_later`: no note about later stages built from the previous `only`
        (`moe run --jobs` builds each unfinished stage this way, in dependency order)."""
        ctx = self.ctx
        stages = self.plan()
        names = self.check_stage(only)
        t0 = time.perf_counter()
        planned = sum(st.tokens for st in stages)
        done_tokens = sum(st.tokens for st in stages if ctx.done(st.name))
        trained = 0
        for i, st in enumerate(stages, 1):
            if only is not None and st.name != only:
                continue
            if ctx.done(st.name) and only is None:
                log(f"[{i}/{len(names)}] {st.name}: done, kept")
                continue
            for dep in st.deps:
                if not ctx.done(dep):
                    raise ConfigError(
                        f"stage {st.name} needs stage {dep} first (run without --stage)"
                    )
            elapsed = time.perf_counter() - t0
            rate = trained / elapsed if trained and elapsed > 0 else None
            eta = f", ETA {fmt_s((planned - done_tokens) / rate)}" if rate else ""
            log(f"[{i}/{len(names)}] {st.name} ({st.kind}; elapsed {fmt_s(elapsed)}{eta})")
            out = ctx.model_dir(st.name)
            if only == st.name and ctx.done(st.name):
                shutil.rmtree(out.parent)  # an explicit --stage re-runs a finished stage
            if st.kind != "train":
                # no resume point: a partial output of these is simply rebuilt
                shutil.rmtree(out.parent, ignore_errors=True)
                out.parent.mkdir(parents=True)
            st.run()
            if only is not None and not quiet_later:
                later = [d.name for d in stages if st.name in self.upstream(d.name)]
                if later:
                    log(
                        f"note: {', '.join(later)} were built from the previous {st.name}; "
                        "re-run them with --stage, or the whole study with --overwrite"
                    )
            trained += st.tokens
            done_tokens += st.tokens
        if only not in (None, "eval", "report"):
            return {}
        results_path = ctx.run_dir / "results.json"
        if only == "report" and results_path.is_file():
            results = json.loads(results_path.read_text())
        else:
            log(f"[{len(names) - 1}/{len(names)}] eval (every model on every domain)")
            # the study's wall time: its stages' own (measured when each ran, over however many
            # invocations), or this invocation's when that is longer
            stage_wall = sum(float(ctx.record(st.name).get("wall_s", 0.0)) for st in stages
                             if ctx.done(st.name))  # fmt: skip
            wall = max(time.perf_counter() - t0, stage_wall)
            if only == "eval" and results_path.is_file():
                # re-evaluating does not change what the study cost: keep its recorded wall time
                wall = json.loads(results_path.read_text()).get("wall_s", wall)
            results = self.evaluate(wall=wall).to_dict()
            results["samples"] = self.samples(results)
            write_json(results_path, results)
        return results

    # ------------------------------------------------------------------ evaluation

    def _load(self, name: str) -> tuple[Transformer, dict]:
        loaded = load_model(self.ctx.model_dir(name))
        return loaded.model, loaded.meta

    def _tokenizer(self):
        """The study's one tokenizer: the one its checkpoints carry (the seed's init= model's,
        else data.tokenizer, else byte)."""
        from moe.data.tokenizer import checkpoint_tokenizer, load_tokenizer

        done = [st.name for st in self.plan() if self.ctx.done(st.name)]
        if not done:
            return load_tokenizer(self.r.data.tokenizer)
        d = self.ctx.model_dir(done[0])
        return checkpoint_tokenizer(d, read_config(d).vocab_size, self.r.data.tokenizer)

    def _eval_cached(self, name: str, fn: Callable[[], dict], key: str, tag: str = "") -> dict:
        """Evaluations are cached beside the stage, keyed by checkpoint ids and eval settings
        (`tag` names a second cache: the study.eval_data sets)."""
        cache = self.ctx.stages_dir / name / f"eval-{name}{tag}.json"
        if cache.is_file():
            try:
                got = json.loads(cache.read_text())
                if got.get("key") == key:
                    return got["report"]
            except (json.JSONDecodeError, KeyError):
                pass
        rep = fn()
        write_json(cache, {"key": key, "report": rep})
        return rep

    def stage_records(self) -> dict[str, StageRecord]:
        ctx = self.ctx
        out = {}
        for st in self.plan():
            if not ctx.done(st.name):
                continue
            rec = ctx.record(st.name)
            pc = count_params(read_config(ctx.model_dir(st.name)))
            out[st.name] = StageRecord(
                name=st.name,
                kind=st.kind,
                steps=int(rec.get("steps", 0)),
                tokens=int(rec.get("tokens", 0)),
                flops=float(rec.get("flops", 0.0)),
                wall_s=float(rec.get("wall_s", 0.0)),
                tokens_by_domain={k: int(v) for k, v in rec.get("tokens_by_domain", {}).items()},
                active_params=pc.active,
                total_params=pc.total,
                checkpoint=str(ctx.model_dir(st.name).relative_to(ctx.run_dir)),
            )
        return out

    def evaluate(self, wall: float) -> StudyResult:
        r, s, ctx = self.r, self.r.study, self.ctx
        doms = list(r.data.domains)
        dm = DomainDataModule(dataclasses.replace(r.data, stream="mixed", weights={}), seed=r.seed,
                              tokenizer=self._tokenizer())  # fmt: skip
        dm.setup("validate")
        train_tokens = {d: int(len(dm.tokens(d).train)) for d in doms}
        progress = False
        if s.eval_protocol == "rolling":  # every held-out document whole (as moe eval)
            how = dict(protocol="rolling", context=s.eval_context)
            settings = f"rolling:{s.eval_context}:{r.eval.batch_size}:{','.join(doms)}"
            batches: int | None = None
            set_batches: int | None = None
        else:
            how = dict(protocol="chunks")
            settings = f"{s.eval_batches}x{r.eval.batch_size}:{','.join(doms)}"
            batches, set_batches = s.eval_batches, 0
        records = self.stage_records()
        sets: list[str] = []
        rep_sets: dict = {}
        if self.eval_data is not None:  # study.eval_data: evaluation sets, each read whole
            sets_cfg, sets, whole = self.eval_data.resolve(r.data, None)
            sets_key = (f"sets:{settings.rsplit(':', 1)[0]}:"
                        f"{json.dumps(self.eval_data.describe())}")
        models: dict[str, ModelResult] = {}
        arms: dict[str, str] = {}
        scored: dict[str, dict | None] = {}  # how the models were scored (the first one's)
        for spec in self.model_specs():
            missing = [n for n in spec.lineage + spec.members if n not in records]
            if missing:
                raise ConfigError(f"model {spec.name}: stage(s) {', '.join(missing)} not built")
            if spec.checkpoint is not None:
                model, meta = self._load(spec.checkpoint)
                rep = self._eval_cached(
                    spec.checkpoint,
                    lambda model=model: evaluate_model(
                        model, r.data, r.seed, doms, batches, r.eval.batch_size,
                        progress, datamodule=dm, **how,
                    ),
                    f"{meta['id']}:{settings}",
                )
                if sets:
                    rep_sets = self._eval_cached(
                        spec.checkpoint,
                        lambda model=model: evaluate_model(
                            model, sets_cfg, r.seed, sets, set_batches, r.eval.batch_size,
                            progress, tokenizer=dm.tokenizer, heldout_only=whole, **how,
                        ),
                        f"{meta['id']}:{sets_key}", tag="-sets",
                    )
                active = records[spec.checkpoint].active_params
                total = records[spec.checkpoint].total_params
            else:
                from moe.eval.ensemble import evaluate_ensemble

                members = [self._load(n) for n in spec.members]
                ids = ",".join(m[1]["id"] for m in members)
                routing = {}
                if spec.extra.get("route") == "centroid":  # c-BTM: top-1 by domain centroid
                    routing = dict(route="centroid", route_domains=list(s.experts))
                rep = self._eval_cached(
                    spec.members[0],
                    lambda members=members, routing=routing: evaluate_ensemble(
                        [m[0] for m in members], r.data, r.seed, doms, batches,
                        r.eval.batch_size, progress, tokenizer=dm.tokenizer, **how, **routing,
                    ),
                    f"{spec.name}:{ids}:{settings}{':tfidf' if routing else ''}",
                    tag=f"-{spec.name}",
                )
                if sets:
                    rep_sets = self._eval_cached(
                        spec.members[0],
                        lambda members=members, routing=routing: evaluate_ensemble(
                            [m[0] for m in members], sets_cfg, r.seed, sets, set_batches,
                            r.eval.batch_size, progress, tokenizer=dm.tokenizer,
                            heldout_only=whole, **how, **routing,
                        ),
                        f"{spec.name}:{ids}:{sets_key}", tag=f"-sets-{spec.name}",
                    )
                # a top-1 routed ensemble (c-BTM) runs one member per token; a mixture runs all
                active = (max if routing else sum)(records[n].active_params for n in spec.members)
                total = sum(records[n].total_params for n in spec.members)
            by_dom: dict[str, int] = {}
            for n in spec.lineage:
                for d, t in records[n].tokens_by_domain.items():
                    by_dom[d] = by_dom.get(d, 0) + t
            models[spec.name] = ModelResult(
                name=spec.name,
                arm=spec.role,
                label=spec.label,
                lineage=list(spec.lineage),
                train_flops=sum(records[n].flops for n in spec.lineage),
                tokens=sum(records[n].tokens for n in spec.lineage),
                tokens_by_domain=by_dom,
                epochs_by_domain={
                    d: round(by_dom.get(d, 0) / max(train_tokens[d], 1), 4) for d in doms
                },
                active_params=active,
                total_params=total,
                eval=rep["domains"],
                checkpoint=records[spec.checkpoint].checkpoint if spec.checkpoint else None,
                routing=rep.get("routing"),
                domain=spec.extra.get("domain"),
                family=spec.extra.get("family"),
                eval_sets=rep_sets.get("domains", {}) if sets else {},
            )
            if spec.label:
                arms[spec.label] = spec.name
            scored.setdefault("protocol", rep.get("protocol"))
        merge = None
        fam_spec = next((m for m in self.model_specs() if m.role == "merge"), None)
        if fam_spec is not None:
            merge = dict(
                family=fam_spec.extra["family"], method=fam_spec.extra["method"],
                inputs=list(fam_spec.extra["inputs"]), output=fam_spec.name,
            )
        rank = self.arm_order()
        return StudyResult(
            name=r.name,
            seed=r.seed,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            wall_s=round(wall, 1),
            device=f"cpu ({torch.get_num_threads()} threads)"
            if not torch.cuda.is_available()
            else torch.cuda.get_device_name(),
            protocol=s.protocol,
            domains=doms,
            experts=list(s.experts),
            split_method=s.split_method,
            arms_run=[a.name for a in self.arms],
            budget=ctx.budget.as_dict(),
            train_tokens_by_domain=train_tokens,
            stages=list(records.values()),
            models=models,
            arms=dict(sorted(arms.items(), key=lambda kv: rank[kv[0]])),
            reference_arm=REFERENCE_LABEL if REFERENCE_LABEL in arms else "",
            curves=self.curves(records),
            merge=merge,
            eval_sets=sets,
            eval_data=list(s.eval_data),
            eval_protocol=scored.get("protocol"),
            equivalence_margin=s.equivalence_margin,
            bootstrap_iters=s.bootstrap_iters,
        )

    def samples(self, results: dict) -> str | None:
        """Greedy continuations of one prompt per domain by the seed, the branches and the MoE."""
        from moe.experiments.study.samples import study_samples

        want = [("seed", "seed")] + [(f"branch-{e}", f"branch-{e}") for e in self.r.study.experts]
        want.append(("moe", ARMS["btx"].label))
        return study_samples(self.ctx, want, results["domains"])

    # ------------------------------------------------------------------ curves

    def _val_points(self, stage: str, flops0: float, rec: StageRecord) -> list[dict]:
        path = self.ctx.stages_dir / stage / "logs" / "metrics.csv"
        if not path.is_file() or not rec.steps:
            return []
        first = int(self.ctx.record(stage).get("first_step", 0))
        per_step = rec.flops / rec.steps
        points: dict[int, dict[str, float]] = {}
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                for k, v in row.items():
                    if k and k.startswith("val/loss_") and v not in ("", None):
                        points.setdefault(int(row["step"]), {})[k[len("val/loss_"):]] = float(v)
        return [
            dict(flops=flops0 + (step - first) * per_step, loss=vals)
            for step, vals in sorted(points.items())
        ]

    def curves(self, records: dict[str, StageRecord]) -> dict[str, list[dict]]:
        if "seed" not in records:
            return {}
        seed = self._val_points("seed", 0.0, records["seed"])
        f_seed = records["seed"].flops
        out = {}
        for name, label in (("dense-compute", REFERENCE_LABEL),
                            ("dense-data", ARMS["monolith_data"].label)):
            if name in records:
                out[label] = seed + self._val_points(name, f_seed, records[name])
        if "moe" in records:
            before = sum(
                rec.flops for n, rec in records.items()
                if n.startswith(("branch-", "ft-")) and n != "moe"
            )
            out[ARMS["btx"].label] = seed + self._val_points(
                "moe", f_seed + before, records["moe"]
            )
        return out


def parse_eval_sets(specs: list[str]):
    """study.eval_data as an EvalData (None when empty); a mistake stops the study before it
    trains anything, named as the recipe field."""
    if not specs:
        return None
    from moe.eval.data_spec import parse_data_spec

    try:
        data = parse_data_spec(list(specs))
    except ConfigError as e:
        raise ConfigError(f"study.eval_data: {str(e).removeprefix('--data ')}") from None
    if data.recipe is not None:
        raise ConfigError("study.eval_data: give DOMAIN=PATH_OR_GLOB (or DOMAIN=hf:NAME) sets; "
                          "the study's own domains are evaluated already")
    return data

