"""`moe run`: the specialization study, end to end, into one run directory.

    seed ─split─▶ experts ─branch (one stream per domain)─▶ branches ─┬─▶ BTM ensemble, average
                                    └ family: 2 fine-tunes ─merge─┘   └─assemble─▶ MoE ─router─▶ moe
    seed ─continued on the mixed stream, same FLOPs (and same tokens)─▶ monolithic baselines
    every model × every domain ─▶ results.json ─▶ report.md + plots/

Each stage writes `stages/<name>/` (a training run directory or a checkpoint under `model/`).
A finished stage is never redone; a killed one resumes from its last Lightning checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moe.config import ConfigError, Recipe, to_dict, to_yaml
from moe.data.datamodule import DomainDataModule
from moe.eval.evaluate import evaluate_model
from moe.io.checkpoint import (
    atomic_write_text,
    is_checkpoint,
    load_checkpoint,
    read_config,
    read_meta,
    write_json,
)
from moe.io.rundir import RunLock
from moe.model.flops import count_params, train_flops_per_token
from moe.model.transformer import Transformer

ARM_LABELS = {
    "moe": "experts (BTX + router)",
    "dense-compute": "monolithic, compute-matched",
    "dense-data": "monolithic, data-matched",
    "btm": "BTM ensemble",
    "avg": "parameter average",
    "seed": "seed",
}
REFERENCE_ARM = ARM_LABELS["dense-compute"]


@dataclass
class Stage:
    name: str
    kind: str  # dense | split | branch | finetune | merge | assemble | router | average
    run: Callable[[Path], None]  # writes stages/<name>/model (resuming when it can)
    planned_tokens: int = 0  # for the ETA; 0 for stages that do not train


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fmt_s(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Study:
    def __init__(self, recipe: Recipe, run_dir: Path):
        self.r = recipe
        self.s = recipe.study
        self.run_dir = run_dir
        self.stages_dir = run_dir / "stages"
        self.tokens_per_step = recipe.data.batch_size * recipe.data.seq_len

    # ------------------------------------------------------------------ paths and records

    def model_dir(self, name: str) -> Path:
        return self.stages_dir / name / "model"

    def done(self, name: str) -> bool:
        return is_checkpoint(self.model_dir(name))

    def stage_record(self, name: str) -> dict:
        return read_meta(self.model_dir(name)).get("stage") or {}

    # ------------------------------------------------------------------ stage builders

    def _train(
        self,
        name: str,
        stage: str,
        steps: int,
        init: Path | None,
        seed: int,
        data=None,
        lr: float | None = None,
        branch_domain: str | None = None,
    ) -> None:
        from moe.train.stages import train

        out = self.stages_dir / name
        resume = out / "resume" / "last.ckpt"
        t = dataclasses.replace(
            self.r.trainer,
            max_steps=steps,
            val_check_interval=min(self.r.trainer.val_check_interval, steps),
        )
        rec = dataclasses.replace(
            self.r,
            name=f"{self.r.name}/{name}",
            stage=stage,
            seed=seed,
            out_dir=str(out),
            init=str(init) if init else None,
            resume=str(resume) if resume.is_file() else None,
            overwrite=True,
            trainer=t,
            data=data or self.r.data,
            optim=dataclasses.replace(self.r.optim, lr=lr) if lr else self.r.optim,
            branch=dataclasses.replace(self.r.branch, domain=branch_domain),
        )
        train(rec)

    def _split(self, out: Path) -> None:
        from moe.experts import split_checkpoint

        split_checkpoint(
            self.model_dir("seed"),
            out,
            list(self.s.experts),
            method=self.s.split_method,
            router="learned",
            top_k=self.s.router_top_k,
            shared_dim=self.s.shared_dim,
            seed=self.r.seed,
            overwrite=True,
        )

    def _merge(
        self, out: Path, inputs: list[Path], base: Path | None, method: str, **extra
    ) -> None:
        from moe.merge import merge

        cfg: dict = {
            "merge_method": method,
            "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in inputs],
            "parameters": {},
            "dtype": "float32",
        }
        if base is not None:
            cfg["base_model"] = str(base)
        if method in ("ties", "dare_ties", "dare_linear"):
            for m in cfg["models"]:
                m["parameters"]["density"] = self.s.merge_density
            cfg["parameters"]["seed"] = self.r.seed
        cfg.update(extra)
        path = out.parent / "merge.yaml"
        atomic_write_text(path, json.dumps(cfg, indent=2))  # JSON is valid YAML
        merge(path, out, overwrite=True, progress=False)

    def _assemble(self, out: Path) -> None:
        from moe.experts import assemble_checkpoints

        fam = self.s.finetune_family
        paths = [
            self.model_dir(f"merge-{e}" if e == fam else f"branch-{e}") for e in self.s.experts
        ]
        assemble_checkpoints(
            paths,
            out,
            experts=list(self.s.experts),
            router="learned",
            top_k=self.s.router_top_k,
            router_init=self.s.router_init,
            seed=self.r.seed,
            overwrite=True,
        )

    def expert_arm_after_seed(self) -> tuple[int, float]:
        """(tokens, FLOPs) the experts arm spent after the seed: branches, fine-tunes, router."""
        names = [f"branch-{e}" for e in self.s.experts] + ["router"]
        if self.s.finetune_family:
            names += [f"ft-{self.s.finetune_family}-{k}" for k in self.s.finetune_seeds]
        tok = flops = 0.0
        for n in names:
            st = self.stage_record(n)
            tok += st.get("tokens", 0)
            flops += st.get("flops", 0.0)
        return int(tok), flops

    def _baseline_steps(self, matched: str) -> int:
        tokens, flops = self.expert_arm_after_seed()
        if matched == "tokens":
            return max(1, round(tokens / self.tokens_per_step))
        seed_cfg = read_config(self.model_dir("seed"))
        per_step = train_flops_per_token(seed_cfg, self.r.data.seq_len) * self.tokens_per_step
        return max(1, round(flops / per_step))

    def _data_matched(self, out: Path) -> None:
        steps = self._baseline_steps("tokens")
        same = self.done("dense-compute") and self._baseline_steps("flops") == steps
        if same:
            # same seed, same steps: training again would reproduce dense-compute bit for bit
            shutil.rmtree(out.parent, ignore_errors=True)
            shutil.copytree(self.stages_dir / "dense-compute", out.parent)
            return
        self._train("dense-data", "dense", steps, self.model_dir("seed"), self.r.seed + 1000)

    def plan(self) -> list[Stage]:
        s, r = self.s, self.r
        single = lambda d: dataclasses.replace(  # noqa: E731
            r.data, domains=[d], stream="separate", weights={}
        )
        tps = self.tokens_per_step
        stages = [
            Stage(
                "seed",
                "dense",
                lambda out: self._train("seed", "dense", s.seed_steps, None, r.seed),
                s.seed_steps * tps,
            ),
            Stage("split", "split", self._split),
        ]
        for e in s.experts:
            stages.append(
                Stage(
                    f"branch-{e}",
                    "branch",
                    lambda out, e=e: self._train(
                        f"branch-{e}",
                        "branch",
                        s.branch_steps,
                        self.model_dir("split"),
                        r.seed,
                        branch_domain=e,
                    ),
                    s.branch_steps * tps,
                )
            )
        fam = s.finetune_family
        if fam:
            for k in s.finetune_seeds:
                stages.append(
                    Stage(
                        f"ft-{fam}-{k}",
                        "finetune",
                        lambda out, k=k: self._train(
                            f"ft-{fam}-{k}",
                            "dense",
                            s.finetune_steps,
                            self.model_dir(f"branch-{fam}"),
                            r.seed + k,
                            data=single(fam),
                        ),
                        s.finetune_steps * tps,
                    )
                )
            stages.append(
                Stage(
                    f"merge-{fam}",
                    "merge",
                    lambda out: self._merge(
                        out,
                        [self.model_dir(f"ft-{fam}-{k}") for k in s.finetune_seeds],
                        self.model_dir(f"branch-{fam}"),
                        s.merge_method,
                    ),
                )
            )
        stages += [
            Stage("btx", "assemble", self._assemble),
            Stage(
                "router",
                "router",
                lambda out: self._train(
                    "router",
                    "router",
                    s.router_steps,
                    self.model_dir("btx"),
                    r.seed + 500,
                    lr=s.router_lr,
                ),
                s.router_steps * tps,
            ),
        ]
        baseline_tokens = (len(s.experts) * s.branch_steps + s.router_steps) * tps
        if "compute_matched" in s.baselines:
            stages.append(
                Stage(
                    "dense-compute",
                    "dense",
                    lambda out: self._train(
                        "dense-compute",
                        "dense",
                        self._baseline_steps("flops"),
                        self.model_dir("seed"),
                        r.seed + 1000,
                    ),
                    baseline_tokens,
                )
            )
        if "data_matched" in s.baselines:
            stages.append(Stage("dense-data", "dense", self._data_matched, baseline_tokens))
        if "param_average" in s.baselines:
            stages.append(
                Stage(
                    "avg",
                    "average",
                    lambda out: self._merge(
                        out,
                        [self.model_dir(f"branch-{e}") for e in s.experts],
                        None,
                        "linear",
                        allow_cross_family=True,
                    ),
                )
            )
        return stages

    # ------------------------------------------------------------------ running

    def run(self, only: str | None = None) -> dict:
        stages = self.plan()
        names = [st.name for st in stages] + ["eval", "report"]
        if only is not None and only not in names:
            raise ConfigError(f"--stage {only!r} is not a stage of this study: {', '.join(names)}")
        t0 = time.perf_counter()
        planned = sum(st.planned_tokens for st in stages)
        done_tokens = sum(st.planned_tokens for st in stages if self.done(st.name))
        trained = 0
        for i, st in enumerate(stages, 1):
            if only is not None and st.name != only:
                continue
            if self.done(st.name) and only is None:
                _log(f"[{i}/{len(names)}] {st.name}: done, kept")
                continue
            for dep in self._deps(st.name):
                if not self.done(dep):
                    raise ConfigError(
                        f"stage {st.name} needs stage {dep} first (run without --stage)"
                    )
            elapsed = time.perf_counter() - t0
            rate = trained / elapsed if trained and elapsed > 0 else None
            left = planned - done_tokens
            eta = f", ETA {_fmt_s(left / rate)}" if rate else ""
            _log(f"[{i}/{len(names)}] {st.name} ({st.kind}; elapsed {_fmt_s(elapsed)}{eta})")
            out = self.model_dir(st.name)
            if only == st.name and self.done(st.name):
                shutil.rmtree(out.parent)  # an explicit --stage re-runs a finished stage
            if st.kind in ("split", "merge", "assemble", "average"):
                # no resume point: a partial output of these is simply rebuilt
                shutil.rmtree(out.parent, ignore_errors=True)
                out.parent.mkdir(parents=True)
            st.run(out)
            if only is not None:
                later = [d.name for d in stages if st.name in self._upstream(d.name)]
                if later:
                    _log(
                        f"note: {', '.join(later)} were built from the previous {st.name}; "
                        "re-run them with --stage, or the whole study with --overwrite"
                    )
            trained += st.planned_tokens
            done_tokens += st.planned_tokens
        results = None
        if only in (None, "eval", "report"):
            if only != "report" or not (self.run_dir / "results.json").is_file():
                _log(f"[{len(names) - 1}/{len(names)}] eval (every model on every domain)")
                results = self.evaluate(wall=time.perf_counter() - t0)
                write_json(self.run_dir / "results.json", results)
            else:
                results = json.loads((self.run_dir / "results.json").read_text())
            from moe.eval.report import write_report

            _log(f"[{len(names)}/{len(names)}] report")
            path = write_report(results, self.run_dir)
            _log(f"wrote {path} ({_fmt_s(time.perf_counter() - t0)})")
        return results or {}

    def _upstream(self, name: str) -> set[str]:
        seen: set[str] = set()
        todo = list(self._deps(name))
        while todo:
            d = todo.pop()
            if d not in seen:
                seen.add(d)
                todo += self._deps(d)
        return seen

    def _deps(self, name: str) -> list[str]:
        s = self.s
        fam = s.finetune_family
        if name == "seed":
            return []
        if name == "split":
            return ["seed"]
        if name.startswith("branch-"):
            return ["split"]
        if name.startswith("ft-"):
            return [f"branch-{fam}"]
        if name.startswith("merge-"):
            return [f"ft-{fam}-{k}" for k in s.finetune_seeds]
        if name == "btx":
            return [f"merge-{e}" if e == fam else f"branch-{e}" for e in s.experts]
        if name == "router":
            return ["btx"]
        if name in ("dense-compute", "dense-data"):
            return ["seed", "router"] + [f"branch-{e}" for e in s.experts]
        if name == "avg":
            return [f"branch-{e}" for e in s.experts]
        return []

    # ------------------------------------------------------------------ evaluation

    def _load(self, name: str) -> tuple[Transformer, dict]:
        ck = load_checkpoint(self.model_dir(name))
        model = Transformer(ck.config)
        model.load_state_dict(ck.state_dict)
        return model, ck.meta

    def _eval_cached(self, name: str, fn: Callable[[], dict], key: str):
        """Evaluations are cached beside the stage, keyed by checkpoint ids and eval settings."""
        cache = self.stages_dir / name / "eval.json"
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

    def evaluate(self, wall: float) -> dict:
        r, s = self.r, self.s
        doms = list(r.data.domains)
        dm = DomainDataModule(dataclasses.replace(r.data, stream="mixed", weights={}), seed=r.seed)
        dm.setup("validate")
        progress = sys.stderr.isatty()
        settings = f"{s.eval_batches}x{r.eval.batch_size}:{','.join(doms)}"
        ledger = []
        for st in self.plan():
            if not self.done(st.name):
                continue
            meta = read_meta(self.model_dir(st.name))
            cfg = read_config(self.model_dir(st.name))
            rec = meta.get("stage") or {}
            pc = count_params(cfg)
            ledger.append(
                dict(
                    name=st.name,
                    kind=st.kind,
                    steps=rec.get("steps", 0),
                    tokens=rec.get("tokens", 0),
                    flops=rec.get("flops", 0.0),
                    wall_s=rec.get("wall_s", 0.0),
                    active_params=pc.active,
                    total_params=pc.total,
                    checkpoint=str(self.model_dir(st.name).relative_to(self.run_dir)),
                )
            )
        by_name = {row["name"]: row for row in ledger}
        seed_tok, seed_flops = by_name["seed"]["tokens"], by_name["seed"]["flops"]
        arm_tok, arm_flops = self.expert_arm_after_seed()
        models: dict[str, dict] = {}

        def add(name: str, arm: str, model_stage: str | None, tokens: float, flops: float, **kw):
            if model_stage is not None:
                model, meta = self._load(model_stage)
                key = f"{meta['id']}:{settings}"
                rep = self._eval_cached(
                    model_stage,
                    lambda: evaluate_model(
                        model,
                        r.data,
                        r.seed,
                        doms,
                        s.eval_batches,
                        r.eval.batch_size,
                        progress,
                        datamodule=dm,
                    ),
                    key,
                )
                row = by_name[model_stage]
                params = (row["active_params"], row["total_params"])
            else:
                rep, params = kw.pop("report"), kw.pop("params")
            models[name] = dict(
                arm=arm,
                checkpoint=str(self.model_dir(model_stage).relative_to(self.run_dir))
                if model_stage
                else None,
                train_flops=flops,
                tokens=int(tokens),
                active_params=params[0],
                total_params=params[1],
                eval=rep["domains"],
                routing=rep.get("routing"),
                **kw,
            )

        add("seed", "seed", "seed", seed_tok, seed_flops)
        for e in s.experts:
            row = by_name[f"branch-{e}"]
            add(
                f"branch-{e}",
                "branch",
                f"branch-{e}",
                seed_tok + row["tokens"],
                seed_flops + row["flops"],
                domain=e,
            )
        fam = s.finetune_family
        merge_info = None
        if fam:
            b = by_name[f"branch-{fam}"]
            ft_names = [f"ft-{fam}-{k}" for k in s.finetune_seeds]
            for n in ft_names:
                row = by_name[n]
                add(
                    n,
                    "finetune",
                    n,
                    seed_tok + b["tokens"] + row["tokens"],
                    seed_flops + b["flops"] + row["flops"],
                    family=fam,
                )
            ft_tok = sum(by_name[n]["tokens"] for n in ft_names)
            ft_flops = sum(by_name[n]["flops"] for n in ft_names)
            add(
                f"merge-{fam}",
                "merge",
                f"merge-{fam}",
                seed_tok + b["tokens"] + ft_tok,
                seed_flops + b["flops"] + ft_flops,
                family=fam,
            )
            merge_info = dict(
                family=fam, method=s.merge_method, inputs=ft_names, output=f"merge-{fam}"
            )
        router = by_name["router"]
        add(
            "btx",
            "moe",
            "btx",
            seed_tok + arm_tok - router["tokens"],
            seed_flops + arm_flops - router["flops"],
        )
        add("moe", "moe", "router", seed_tok + arm_tok, seed_flops + arm_flops)
        for n, arm in (("dense-compute", "compute_matched"), ("dense-data", "data_matched")):
            if n in by_name:
                add(n, arm, n, seed_tok + by_name[n]["tokens"], seed_flops + by_name[n]["flops"])
        branch_tok = sum(by_name[f"branch-{e}"]["tokens"] for e in s.experts)
        branch_flops = sum(by_name[f"branch-{e}"]["flops"] for e in s.experts)
        if "avg" in by_name:
            add("avg", "param_average", "avg", seed_tok + branch_tok, seed_flops + branch_flops)
        if "btm_ensemble" in s.baselines:
            from moe.eval.ensemble import evaluate_ensemble

            branches = [self._load(f"branch-{e}")[0] for e in s.experts]
            ids = ",".join(
                read_meta(self.model_dir(f"branch-{e}"))["id"]
                for e in s.experts
            )
            rep = self._eval_cached(
                "split",  # the ensemble has no stage of its own: cache beside the split
                lambda: evaluate_ensemble(
                    branches, r.data, r.seed, doms, s.eval_batches, r.eval.batch_size, progress
                ),
                f"btm:{ids}:{settings}",
            )
            one = by_name[f"branch-{s.experts[0]}"]
            add(
                "btm",
                "btm_ensemble",
                None,
                seed_tok + branch_tok,
                seed_flops + branch_flops,
                report=rep,
                params=(
                    one["active_params"] * len(s.experts),
                    one["total_params"] * len(s.experts),
                ),
            )
        arms = {label: n for n, label in ARM_LABELS.items() if n in models}
        results = dict(
            name=r.name,
            seed=r.seed,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            wall_s=round(wall, 1),
            device=f"cpu ({torch.get_num_threads()} threads)"
            if not torch.cuda.is_available()
            else torch.cuda.get_device_name(),
            domains=doms,
            experts=list(s.experts),
            split_method=s.split_method,
            stages=ledger,
            models=models,
            arms=arms,
            reference_arm=REFERENCE_ARM,
            curves=self.curves(by_name),
            merge=merge_info,
            command=f"moe run {self.r.name}",
        )
        return results

    # ------------------------------------------------------------------ curves

    def _val_points(self, stage: str, flops0: float, flops_per_step: float) -> list[dict]:
        path = self.stages_dir / stage / "logs" / "metrics.csv"
        if not path.is_file():
            return []
        points: dict[int, dict[str, float]] = {}
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                for k, v in row.items():
                    if k and k.startswith("val/loss_") and v not in ("", None):
                        points.setdefault(int(row["step"]), {})[k[len("val/loss_") :]] = float(v)
        return [
            dict(flops=flops0 + step * flops_per_step, loss=vals)
            for step, vals in sorted(points.items())
        ]

    def curves(self, by_name: dict) -> dict:
        def fps(stage: str) -> float:
            row = by_name[stage]
            return row["flops"] / row["steps"] if row["steps"] else 0.0

        seed = self._val_points("seed", 0.0, fps("seed"))
        f_seed = by_name["seed"]["flops"]
        out = {}
        for n in ("dense-compute", "dense-data"):
            if n in by_name:
                out[ARM_LABELS[n]] = seed + self._val_points(n, f_seed, fps(n))
        router = by_name["router"]
        _, arm_flops = self.expert_arm_after_seed()
        f_btx = f_seed + arm_flops - router["flops"]
        out[ARM_LABELS["moe"]] = seed + self._val_points("router", f_btx, fps("router"))
        return out


def run_study(
    recipe: Recipe, only: str | None = None, seeds: int = 1, recipe_path: str | None = None
) -> Path:
    """Run (or resume) the study; `seeds` > 1 repeats it and reports mean and spread."""
    run_dir = Path(recipe.out_dir)
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if only is not None and seeds > 1:
        raise ConfigError("--stage runs one stage of one study; drop --seeds")
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        saved = run_dir / "recipe.yaml"
        text = to_yaml(recipe)
        if saved.is_file() and not recipe.overwrite and _study_changed(saved, recipe):
            raise ConfigError(
                f"{run_dir} holds a study with a different recipe; pass --overwrite to replace "
                "it or choose another out_dir"
            )
        if recipe.overwrite and (run_dir / "stages").exists() and only is None:
            shutil.rmtree(run_dir / "stages")
        atomic_write_text(saved, text)
        cmd = f"moe run {recipe_path}" if recipe_path else "moe run"
        if seeds == 1:
            res = Study(recipe, run_dir).run(only)
            if res:
                res["command"] = cmd
                write_json(run_dir / "results.json", res)
                from moe.eval.report import write_report

                write_report(res, run_dir)
            return run_dir / "report.md"
        all_res = []
        for k in range(seeds):
            sub = dataclasses.replace(
                recipe, seed=recipe.seed + k, out_dir=str(run_dir / f"seed-{recipe.seed + k}")
            )
            _log(f"== seed {k + 1}/{seeds} ({sub.out_dir})")
            Path(sub.out_dir).mkdir(parents=True, exist_ok=True)
            res = Study(sub, Path(sub.out_dir)).run()
            res["command"] = f"{cmd} --seeds {seeds}"
            write_json(Path(sub.out_dir) / "results.json", res)
            all_res.append(res)
        from moe.eval.report import aggregate, write_aggregate_report

        agg = aggregate(all_res)
        write_json(run_dir / "results.json", agg)
        return write_aggregate_report(agg, run_dir)


def _study_changed(saved: Path, recipe: Recipe) -> bool:
    """Whether a run directory's recorded recipe differs in anything that changes results."""
    from omegaconf import OmegaConf

    old = OmegaConf.to_container(OmegaConf.load(saved), resolve=False)
    new = to_dict(recipe)
    for key in ("overwrite", "resume", "out_dir", "name"):
        old.pop(key, None)
        new.pop(key, None)
    old.get("trainer", {}).pop("enable_progress_bar", None)
    new.get("trainer", {}).pop("enable_progress_bar", None)
    return json.dumps(old, sort_keys=True, default=str) != json.dumps(
        new, sort_keys=True, default=str
    )
