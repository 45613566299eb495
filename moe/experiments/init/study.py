"""The init-from-distribution experiment (issue 15): `moe run recipes/init/study.yaml`.

1. A source model trains on the corpora's train split (its own data order) for
   `init_study.source_steps` steps, with the recipe's optimiser and schedule.
2. For each arm (`METHOD[+norms][+emb]`, see moe/model/init_dist.py) × warm-up setting ×
   seed, a target is initialised from the source's weights by that method and trained for
   `init_study.steps` steps on the train split, in the seed's data order. Held-out bits per byte
   (documents neither the source nor the targets trained on) are measured every `eval_every`
   steps; per-tensor diagnostics (stable rank, top singular value, kurtosis, Wasserstein-1
   distance to the trained tensor's values) at `diagnostics_at` steps.
3. The report: bpb against steps (and FLOPs) with 95% bands over seeds; steps to reach
   thresholds set by the `standard` arm's mean curve (with warm-up) at `thresholds_at` of the
   run, as paired ratios to `standard`; paired bpb gains at equal steps early, midway and at the
   end (does the gain fade?); the warm-up ablation; the diagnostics.

Training is moe/train/loop.py's plain step loop (the same model, chunked loss, AdamW groups,
schedule and gradient clipping as `moe train`), without the Lightning Trainer: these runs are a
few hundred steps of a 30K-parameter model, where the Trainer's per-run start-up would dominate.
Held-out bpb is moe/eval/heldout.py's `HeldOut`.
Each finished run is saved as JSON under `<out_dir>/runs/`, so an interrupted study resumes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from moe.config import ConfigError, Recipe
from moe.data.datamodule import DomainDataModule
from moe.eval.heldout import HeldOut
from moe.experiments import cached_run
from moe.io.checkpoint import load_checkpoint, make_meta, save_checkpoint, write_json
from moe.model.flops import train_flops_per_token
from moe.model.init_dist import METHODS, init_state
from moe.model.transformer import Transformer
from moe.train.loop import make_optimizer, train_steps

SOURCE_SEED_OFFSET = 10_000  # the source's init and data order differ from every target's


def parse_arm(arm: str) -> tuple[str, bool, bool]:
    """'histogram+emb+norms' -> ('histogram', keep_norms, keep_embeddings)."""
    method, *flags = arm.split("+")
    bad = [f for f in flags if f not in ("norms", "emb")]
    if method not in METHODS or bad:
        raise ConfigError(
            f"init_study.arms: {arm!r} is not METHOD[+norms][+emb] with METHOD one of "
            f"{', '.join(sorted(METHODS))}"
        )
    if method == "select":
        raise ConfigError("init_study.arms: 'select' makes a smaller model; this study trains "
                          "targets of the source's shape")  # fmt: skip
    return method, "norms" in flags, "emb" in flags


# ----------------------------------------------------------------------------- diagnostics


def tensor_stats(w: torch.Tensor, ref: torch.Tensor) -> dict:
    """Stable rank ‖W‖²_F/σ₁², top singular value (2-D only), excess kurtosis, and the
    Wasserstein-1 distance between the values of `w` and of `ref` (same count: mean |sorted
    differences|)."""
    x = w.detach().double().flatten()
    d = x - x.mean()
    var = float(d.pow(2).mean())
    out = {
        "kurtosis": float(d.pow(4).mean()) / var**2 - 3.0 if var > 0 else None,
        "w1": float((x.sort().values - ref.detach().double().flatten().sort().values)
                    .abs().mean()),  # fmt: skip
    }
    if w.ndim == 2:
        s = torch.linalg.svdvals(w.detach().double())
        out["top_sv"] = float(s[0])
        out["stable_rank"] = float(s.pow(2).sum() / s[0] ** 2) if s[0] > 0 else None
    return out


def diagnostics(model: Transformer, ref: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {n: tensor_stats(p, ref[n]) for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- training


def train_loop(model: Transformer, r: Recipe, optim, steps: int, dm: DomainDataModule,
               heldout: HeldOut | None, eval_every: int, diag_at: list[int],
               ref: dict[str, torch.Tensor] | None, trainable: str = "all") -> dict:  # fmt: skip
    """Train `model` for `steps` steps (moe.train.loop); the curve of held-out bpb, train losses,
    diagnostics. trainable: which parameters train (moe.train.loop.set_trainable's choices).
    A non-finite loss stops the run: `diverged_at` is its step."""
    opt, sched = make_optimizer(model, optim, steps, trainable=trainable)
    rec: dict = {"eval_steps": [], "bpb": [], "train_loss": [], "diagnostics": {},
                 "diverged_at": None}  # fmt: skip

    def observe(step: int) -> None:
        if heldout is not None and (step % eval_every == 0 or step == steps):
            rec["eval_steps"].append(step)
            rec["bpb"].append(heldout.bpb(model))
        if ref is not None and step in diag_at:
            rec["diagnostics"][str(step)] = diagnostics(model, ref)

    done = train_steps(model, opt, dm.train_batches(0), steps, sched=sched,
                       domain_names=dm.domain_names, grad_clip=optim.grad_clip, on_step=observe)
    rec["train_loss"], rec["diverged_at"] = done.losses, done.diverged_at
    if done.diverged_at is None:
        observe(steps)
    return rec


# ----------------------------------------------------------------------------- the study


def _source(r: Recipe, out: Path, dm: DomainDataModule) -> tuple[Path, dict]:
    path = out / "source"
    if (path / "meta.json").is_file():
        return path, json.loads((path / "source.json").read_text())
    s = r.init_study
    torch.manual_seed(r.seed + SOURCE_SEED_OFFSET)
    model = Transformer(r.model)
    t0 = time.time()
    src_dm = DomainDataModule(dm.cfg, seed=r.seed + SOURCE_SEED_OFFSET, tokenizer=dm.tokenizer)
    rec = train_loop(model, r, r.optim, s.source_steps, src_dm, None, 1, [], None)
    if rec["diverged_at"] is not None:
        raise ConfigError(f"init study: the source model diverged at step {rec['diverged_at']}")
    tokens = s.source_steps * r.data.batch_size * r.data.seq_len
    flops = tokens * train_flops_per_token(model.config, r.data.seq_len)
    meta = make_meta(kind="dense", tokens_seen=tokens, train_flops=flops,
                     recipe=dataclasses.asdict(r))  # fmt: skip
    save_checkpoint(path, model.state_dict(), model.config, meta, overwrite=True)
    info = {"steps": s.source_steps, "tokens": tokens, "train_flops": flops,
            "wall_s": time.time() - t0, "final_train_loss": rec["train_loss"][-1]}  # fmt: skip
    write_json(path / "source.json", info)
    return path, info


def run_init_study(r: Recipe, seeds: int | None = None, recipe_path: str | None = None) -> Path:
    """Run (or resume) the study of `r.init_study`; returns the report's path."""
    s = r.init_study
    seeds = s.seeds if seeds is None else seeds
    check(r, seeds)
    arms = list(s.arms)
    out = Path(r.out_dir)  # emptied by --overwrite in moe.experiments.experiment_dir
    (out / "runs").mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    dm = DomainDataModule(r.data, seed=r.seed)
    dm.setup()
    heldout = HeldOut(dm, list(r.data.domains), s.eval_batches, r.eval.batch_size)
    src_path, src_info = _source(r, out, dm)
    src = load_checkpoint(src_path)
    src_info["heldout_bpb"] = heldout.bpb(Transformer.from_state(src.config, src.state_dict))
    runs = []
    for arm in arms:
        method, keep_norms, keep_emb = parse_arm(arm)
        for w in s.warmup:
            for i in range(seeds):
                seed = r.seed + i

                def one(arm=arm, method=method, keep_norms=keep_norms, keep_emb=keep_emb,
                        w=w, seed=seed) -> dict:  # fmt: skip
                    init = init_state(src.state_dict, src.config, method, seed=seed,
                                      keep_norms=keep_norms, keep_embeddings=keep_emb)  # fmt: skip
                    model = Transformer.from_state(init.config, init.state_dict)
                    optim = dataclasses.replace(r.optim, warmup_steps=w,
                                                lr=s.target_lr or r.optim.lr)  # fmt: skip
                    tdm = DomainDataModule(r.data, seed=seed, tokenizer=dm.tokenizer)
                    tdm._tokens = dm._tokens  # same corpora; only the data order differs
                    rec = train_loop(model, r, optim, s.steps, tdm, heldout, s.eval_every,
                                     list(s.diagnostics_at), src.state_dict)  # fmt: skip
                    rec.update(arm=arm, warmup=w, seed=seed)
                    return rec

                runs.append(cached_run(
                    out, f"{arm}-warmup{w}-seed{seed}", one, "init study",
                    lambda rec: "final bpb "
                    f"{rec['bpb'][-1]['mean'] if rec['bpb'] else float('nan'):.4f}"))  # fmt: skip
    flops_step = (r.data.batch_size * r.data.seq_len
                  * train_flops_per_token(src.config, r.data.seq_len))  # fmt: skip
    from moe.experiments.init.report import summarise, write_report

    results = summarise(runs, r, arms, src_info, flops_step, seeds)
    results["wall_s"] = time.time() - t_start  # this invocation's (a resumed one: less)
    results["train_wall_s"] = src_info["wall_s"] + sum(x["wall_s"] for x in runs)
    results["recipe"] = recipe_path
    write_json(out / "results.json", results)
    return write_report(results, out, runs)


# ----------------------------------------------------------------------------- `moe run` entry


def check(r: Recipe, seeds: int) -> None:
    """Every recipe mistake, before anything is trained (the run and --dry-run both check)."""
    s = r.init_study
    for a in s.arms:
        parse_arm(a)
    if "standard" not in s.arms:
        raise ConfigError("init_study.arms: 'standard' (the control) must be one of the arms")
    if seeds < 1 or s.steps < 1 or s.source_steps < 1 or not s.warmup or s.eval_every < 1:
        raise ConfigError("init_study: seeds, steps, source_steps and eval_every must be >= 1 "
                          "and warmup must list at least one setting")  # fmt: skip


def plan(r: Recipe, seeds: int | None = None) -> str:
    """What `moe run --dry-run` prints for an init study."""
    s = r.init_study
    n = s.seeds if seeds is None else seeds
    check(r, n)
    return (f"init study {r.name}: source {s.source_steps} steps; then {len(s.arms)} arms x "
            f"warm-up {s.warmup} x {n} seeds = {len(s.arms) * len(s.warmup) * n} targets of "
            f"{s.steps} steps (arms: {', '.join(s.arms)})")


def run(r: Recipe, seeds: int | None = None, recipe_path: str | None = None) -> Path:
    return run_init_study(r, seeds=seeds, recipe_path=recipe_path)
