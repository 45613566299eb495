"""The measurements of issue 13, one `kind` each: `moe run recipes/surgery/<kind>.yaml`.

growth       a small model trains `small_steps`; it is grown to the recipe's model by each method
             WIDTH+DEPTH (WIDTH: zero = zero-output new units, split = Net2Net copies; DEPTH:
             identity = LLaMA-Pro identity blocks, stack = the layers repeated in order) and
             trained `steps`; the same model trains `steps` from scratch. Reported: the FLOPs
             each needs (the small model's included) to reach the from-scratch model's final
             held-out bpb, as a saving against from-scratch (bert2BERT/LiGO report 45-50%).
depth_probe  a model trains `steps`; held-out bpb per domain with each single layer deleted,
             and with each single layer duplicated (training-free); Block Influence per domain.
shrink       a model trains `steps`; bpb per domain with `fractions` of each axis removed
             (layers by Block Influence, FFN neurons / heads by magnitude), then after
             `heal_steps` of training; the uncut model trained as long is the control.
retokenize   see moe/experiments/surgery/retokenize.py.

Every interval is a 95% t interval over seeds. Runs are plain loops around LitLM (as in
moe/experiments/init/study.py, whose `train_loop` and `HeldOut` they share); each finished run is a
JSON file under <out_dir>/runs/, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from moe.config import ConfigError, ModelConfig, Recipe
from moe.data.datamodule import DomainDataModule
from moe.eval.heldout import HeldOut
from moe.experiments import cached_run
from moe.experiments.init.study import train_loop
from moe.model.flops import train_flops_per_token
from moe.model.transformer import Transformer
from moe.surgery.structure import grow_ffn, grow_width, insert_identity, select_layers

KINDS = ("growth", "depth_probe", "shrink", "retokenize")
WIDTH = ("zero", "split")
DEPTH = ("identity", "stack")


# ----------------------------------------------------------------------------- shared


class Ctx:
    """The run directory, the corpora (built once) and the held-out batches."""

    def __init__(self, r: Recipe):
        self.r, self.s = r, r.surgery
        self.out = Path(r.out_dir)  # emptied by --overwrite in moe.experiments.experiment_dir
        (self.out / "runs").mkdir(parents=True, exist_ok=True)
        self.dm = DomainDataModule(r.data, seed=r.seed)
        self.dm.setup()
        self.domains = list(r.data.domains)
        self.heldout = HeldOut(self.dm, self.domains, self.s.eval_batches, r.eval.batch_size)

    def data(self, seed: int) -> DomainDataModule:
        """The same corpora in seed's data order."""
        dm = DomainDataModule(self.r.data, seed=seed, tokenizer=self.dm.tokenizer)
        dm._tokens = self.dm._tokens
        return dm

    def cached(self, name: str, fn) -> dict:
        """A run's record: read back if it finished before, else computed and saved."""
        return cached_run(self.out, name, fn, f"surgery {self.s.kind}")

    def train(self, model: Transformer, steps: int, seed: int, eval_every: int | None,
              warmup: int | None = None, lr: float | None = None) -> dict:  # fmt: skip
        optim = self.r.optim if warmup is None else dataclasses.replace(
            self.r.optim, warmup_steps=warmup, total_steps=None)  # fmt: skip
        if lr is not None:
            optim = dataclasses.replace(optim, lr=lr)
        torch.manual_seed(seed)
        held = self.heldout if eval_every else None
        rec = train_loop(model, self.r, optim, steps, self.data(seed), held, eval_every or 1, [],
                         None)  # fmt: skip
        if rec["diverged_at"] is not None:
            raise ConfigError(f"surgery {self.s.kind}: training diverged at step "
                              f"{rec['diverged_at']} (seed {seed}); lower optim.lr")  # fmt: skip
        return rec

    def flops_per_step(self, cfg: ModelConfig) -> float:
        d = self.r.data
        return d.batch_size * d.seq_len * train_flops_per_token(cfg, d.seq_len)

    def trained(self, name: str, cfg: ModelConfig, steps: int, seed: int) -> Transformer:
        """A model trained `steps` (no evaluations), saved under models/ so reruns reuse it."""
        from moe.io.checkpoint import is_checkpoint, load_checkpoint, make_meta, save_checkpoint

        path = self.out / "models" / name
        if is_checkpoint(path):
            ck = load_checkpoint(path)
            return Transformer.from_state(ck.config, ck.state_dict)
        torch.manual_seed(seed)
        model = Transformer(cfg)
        self.train(model, steps, seed, None)
        tokens = steps * self.r.data.batch_size * self.r.data.seq_len
        meta = make_meta(tokens_seen=tokens, train_flops=steps * self.flops_per_step(cfg),
                         recipe=dataclasses.asdict(self.r))  # fmt: skip
        save_checkpoint(path, model.state_dict(), model.config, meta, overwrite=True)
        return model


def seeds_of(r: Recipe, seeds: int | None) -> list[int]:
    n = r.surgery.seeds if seeds is None else seeds
    if n < 1:
        raise ConfigError("surgery.seeds must be >= 1")
    return [r.seed + i for i in range(n)]


# ----------------------------------------------------------------------------- growth


def parse_method(m: str) -> tuple[str, str]:
    width, sep, depth = m.partition("+")
    if not sep or width not in WIDTH or depth not in DEPTH:
        raise ConfigError(f"surgery.methods: {m!r} is not WIDTH+DEPTH with WIDTH one of "
                          f"{', '.join(WIDTH)} and DEPTH one of {', '.join(DEPTH)}")  # fmt: skip
    return width, depth


def small_config(r: Recipe) -> tuple[ModelConfig, ModelConfig]:
    big = r.model.resolved()
    keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")
    bad = [k for k in r.surgery.small if k not in keys]
    if bad:
        raise ConfigError(f"surgery.small: {bad[0]!r} is not one of {', '.join(keys)}")
    small = dataclasses.replace(big, **r.surgery.small).resolved()
    for k in keys:
        if getattr(small, k) > getattr(big, k):
            raise ConfigError(f"surgery.small.{k}={getattr(small, k)} is larger than the "
                              f"model's {getattr(big, k)}; growth starts smaller")  # fmt: skip
    if small.head_size() != big.head_size():
        raise ConfigError(f"surgery.small: head size {small.head_size()} differs from the "
                          f"model's {big.head_size()}; growth keeps the head size")  # fmt: skip
    if small.n_heads // small.n_kv_heads != big.n_heads // big.n_kv_heads:
        raise ConfigError("surgery.small: the query heads per key/value group must match")
    if big.n_layers % small.n_layers:
        raise ConfigError(f"surgery: the model's {big.n_layers} layers are not a multiple of "
                          f"the small model's {small.n_layers} (stacking)")  # fmt: skip
    return small, big


def grow_to(small: ModelConfig, sd: dict, big: ModelConfig, method: str, noise: float,
            seed: int) -> tuple[ModelConfig, dict]:  # fmt: skip
    width, depth = parse_method(method)
    cfg, sd = grow_ffn(small, sd, big.ffn_dim, method=width, noise=noise, seed=seed)
    cfg, sd = grow_width(cfg, sd, dim=big.dim, n_kv_heads=big.n_kv_heads, method=width,
                         noise=noise, seed=seed)  # fmt: skip
    k = big.n_layers // small.n_layers
    if k > 1 and depth == "identity":  # LLaMA-Pro: k-1 identity blocks after every layer
        cfg, sd = insert_identity(cfg, sd, [i for i in range(small.n_layers) for _ in range(k - 1)])
    elif k > 1:  # stacking (StackBERT): the whole stack repeated k times
        cfg, sd = select_layers(cfg, sd, list(range(small.n_layers)) * k)
    return cfg, sd


def run_growth(ctx: Ctx, seeds: list[int]) -> dict:
    s = ctx.s
    small, big = small_config(ctx.r)
    methods = list(s.methods)
    for m in methods:
        parse_method(m)
    runs: dict = {"scratch": {}, "small": {}, **{m: {} for m in methods}}
    for seed in seeds:
        runs["scratch"][str(seed)] = ctx.cached(f"scratch-seed{seed}", lambda seed=seed: ctx.train(
            _fresh(big, seed), s.steps, seed, s.eval_every))  # fmt: skip
        sm = ctx.trained(f"small-seed{seed}", small, s.small_steps, seed)
        runs["small"][str(seed)] = ctx.cached(f"small-seed{seed}", lambda sm=sm: {
            "bpb": ctx.heldout.bpb(sm), "steps": s.small_steps})  # fmt: skip
        for m in methods:

            def go(m=m, sm=sm, seed=seed):
                cfg, sd = grow_to(small, sm.state_dict(), big, m, s.noise, seed)
                model = Transformer.from_state(cfg, sd)
                return ctx.train(model, s.steps, seed, s.eval_every, warmup=s.warmup_steps)

            runs[m][str(seed)] = ctx.cached(f"{m}-seed{seed}", go)
    o = ctx.r.optim
    # where the WSD cool-down begins (the loss drops there whatever came before)
    decay_start = s.steps * (1 - o.decay_fraction) if o.schedule == "wsd" else None
    return {"small_config": dataclasses.asdict(small), "big_config": dataclasses.asdict(big),
            "decay_start": decay_start,
            "flops_step_small": ctx.flops_per_step(small), "flops_step_big":
            ctx.flops_per_step(big), "methods": methods, "runs": runs}  # fmt: skip


def _fresh(cfg: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg)


# ----------------------------------------------------------------------------- depth probe


def run_depth_probe(ctx: Ctx, seeds: list[int]) -> dict:
    from moe.surgery.shrink import calibration_batches

    s = ctx.s
    cfg = ctx.r.model.resolved()
    if cfg.n_layers < 2:
        raise ConfigError("surgery depth_probe: the model needs at least 2 layers")
    runs = {}
    for seed in seeds:
        model = ctx.trained(f"model-seed{seed}", cfg, s.steps, seed)

        def probe(model=model, seed=seed):
            from moe.surgery.influence import block_influence

            sd = model.state_dict()
            rec = {"base": ctx.heldout.bpb(model), "delete": [], "duplicate": [], "bi": {}}
            L = cfg.n_layers
            for i in range(L):
                c, d = select_layers(cfg, sd, [j for j in range(L) if j != i])
                rec["delete"].append(ctx.heldout.bpb(Transformer.from_state(c, d)))
                c, d = select_layers(cfg, sd, list(range(i + 1)) + list(range(i, L)))
                rec["duplicate"].append(ctx.heldout.bpb(Transformer.from_state(c, d)))
            for dom in ctx.domains:
                b = calibration_batches(ctx.r.data, ctx.dm.tokenizer, seed, dom, 4,
                                        ctx.r.eval.batch_size, [], "learned")  # fmt: skip
                rec["bi"][dom] = block_influence(model, b)
            return rec

        runs[str(seed)] = ctx.cached(f"probe-seed{seed}", probe)
    return {"n_layers": cfg.n_layers, "runs": runs}


# ----------------------------------------------------------------------------- `moe run` entry


def _check(r: Recipe) -> None:
    s = r.surgery
    if s.kind not in KINDS:
        raise ConfigError(f"surgery.kind: {s.kind!r}; choose one of {', '.join(KINDS)}")
    if s.steps < 1 or s.eval_every < 1 or s.eval_batches < 1:
        raise ConfigError("surgery: steps, eval_every and eval_batches must be >= 1")
    if s.kind == "growth":
        if not s.methods:
            raise ConfigError("surgery growth: list methods (e.g. zero+identity, split+stack)")
        for m in s.methods:
            parse_method(m)
        small_config(r)
    if s.kind == "shrink":
        from moe.experiments.surgery.shrink import check as check_shrink

        check_shrink(r)
    if s.kind == "retokenize":
        from moe.experiments.surgery.retokenize import check as check_retok

        check_retok(r)


def plan(r: Recipe, seeds: int | None = None) -> str:
    _check(r)
    s = r.surgery
    n = len(seeds_of(r, seeds))
    if s.kind == "growth":
        return (f"surgery growth {r.name}: per seed ({n}) a small model {s.small_steps} steps, "
                f"the model from scratch {s.steps} steps, and {len(s.methods)} grown models "
                f"({', '.join(s.methods)}) {s.steps} steps each")  # fmt: skip
    if s.kind == "depth_probe":
        L = r.model.resolved().n_layers
        return (f"surgery depth_probe {r.name}: per seed ({n}) a model {s.steps} steps, then "
                f"{2 * L} probes (each of {L} layers deleted, duplicated)")  # fmt: skip
    if s.kind == "shrink":
        from moe.experiments.surgery.shrink import plan as plan_shrink

        return plan_shrink(r, n)
    from moe.experiments.surgery.retokenize import plan as plan_retok

    return plan_retok(r, n)


def run(r: Recipe, seeds: int | None = None, recipe_path: str | None = None) -> Path:
    _check(r)
    ss = seeds_of(r, seeds)
    t0 = time.time()
    ctx = Ctx(r)
    if r.surgery.kind == "growth":
        res = run_growth(ctx, ss)
    elif r.surgery.kind == "depth_probe":
        res = run_depth_probe(ctx, ss)
    elif r.surgery.kind == "shrink":
        from moe.experiments.surgery.shrink import run_shrink

        res = run_shrink(ctx, ss)
    else:
        from moe.experiments.surgery.retokenize import run_retokenize

        res = run_retokenize(ctx, ss)
    res.update(kind=r.surgery.kind, name=r.name, seeds=ss, domains=ctx.domains,
               recipe=recipe_path, wall_s=time.time() - t0,
               train_wall_s=_wall(ctx.out))  # fmt: skip
    from moe.experiments.surgery.report import write_report

    return write_report(res, ctx.out, r)


def _wall(out: Path) -> float:
    return sum(json.loads(f.read_text()).get("wall_s", 0.0) for f in (out / "runs").glob("*.json"))
