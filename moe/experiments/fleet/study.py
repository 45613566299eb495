"""The delta experiments (issue 16), run by `moe run recipes/fleet/*.yaml` (`fleet:` section).

Both kinds start from one base model trained `fleet.base_steps` steps on the mixed stream of
the corpora's train split (saved at `<out_dir>/base`, with lineage).

kind: sizes (recipes/fleet/sizes.yaml)
    For each domain d and seed: the base is fine-tuned `steps` steps on d's training stream (the
    seed's data order), saved as a checkpoint of family d, and its lossless delta extracted
    (`moe delta extract`). Each compression spec of `methods` re-encodes that delta (`moe delta
    compress`, DARE's mask from the seed); the compressed delta is applied to the base and the
    result evaluated on every domain's held-out documents. Each row: the file's exact size in
    bytes, its tensor payload, the stored density, and the bpb per domain.

kind: fleet (recipes/fleet/fleet.yaml, cross_family.yaml)
    Each arm (moe/experiments/fleet/fleet.py) × seed runs a fleet from the base on its family's
    stream (or the synchronous baseline); held-out bpb of each coordinator's model at round
    ends against the bytes the replicas have sent so far.

Every finished (arm or domain) × seed is saved as JSON under `<out_dir>/runs/`, and a fleet's
whole state every `checkpoint_every` local steps under `<out_dir>/state/`, so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from moe.config import ConfigError, Recipe
from moe.data.datamodule import DomainDataModule
from moe.delta import ops
from moe.delta.format import read_delta
from moe.delta.registry import parse_spec
from moe.eval.heldout import HeldOut
from moe.experiments import cached_run
from moe.experiments.fleet.fleet import FleetSpec, parse_arm, run_fleet
from moe.experiments.init.study import train_loop
from moe.io.checkpoint import load_checkpoint, make_meta, save_checkpoint, write_json
from moe.model.flops import train_flops_per_token
from moe.model.transformer import Transformer

KINDS = ("sizes", "fleet")
BASE_SEED_OFFSET = 10_000  # the base's init and data order differ from every fine-tune's


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.,=+-]+", "_", text.replace(":", "-").replace(" ", "_"))


def check(r: Recipe, seeds: int) -> None:
    """Every recipe error, before anything is built or written."""
    f = r.fleet
    if f.kind not in KINDS:
        raise ConfigError(f"fleet.kind: {f.kind!r} is not one of {', '.join(KINDS)}")
    if f.base_steps < 1 or f.steps < 1 or seeds < 1 or f.eval_every < 1 or f.eval_batches < 1:
        raise ConfigError("fleet: base_steps, steps, seeds, eval_every and eval_batches must be "
                          ">= 1")
    if not f.domains:
        raise ConfigError("fleet.domains: list the fine-tuned domains (sizes) or the fleet's "
                          "families (fleet)")
    for d in f.domains:
        if d not in r.data.domains:
            raise ConfigError(f"fleet.domains: {d!r} is not in data.domains "
                              f"({', '.join(r.data.domains)})")
    if f.kind == "sizes":
        if not f.methods:
            raise ConfigError("fleet.methods: list at least one compression spec (kind sizes)")
        for m in f.methods:
            parse_spec(m)
        if f.arms:
            raise ConfigError("fleet.arms: arms belong to kind fleet, not sizes")
    else:
        if not f.arms:
            raise ConfigError("fleet.arms: list at least one arm (kind fleet)")
        if f.replicas < 1:
            raise ConfigError(f"fleet.replicas must be >= 1, got {f.replicas}")
        for a in f.arms:
            arm = parse_arm(a, f.replicas, [f.domains[0]])
            for fam in arm.families:
                if fam not in r.data.domains:
                    raise ConfigError(f"fleet.arms: {a!r}: family {fam!r} is not in data.domains")
            if not arm.sync and f.steps % arm.H:
                raise ConfigError(f"fleet.arms: {a!r}: steps ({f.steps}) must be a multiple of H "
                                  f"({arm.H})")


def _optim(r: Recipe):
    f = r.fleet
    return dataclasses.replace(r.optim, lr=f.lr or r.optim.lr, warmup_steps=f.warmup_steps)


def base_model(r: Recipe, out: Path, dm: DomainDataModule) -> tuple[Path, dict]:
    """Train (or reload) the shared base on the mixed stream."""
    path = out / "base"
    if (path / "meta.json").is_file() and (out / "base.json").is_file():
        return path, json.loads((out / "base.json").read_text())
    torch.manual_seed(r.seed + BASE_SEED_OFFSET)
    model = Transformer(r.model)
    t0 = time.time()
    bdm = DomainDataModule(dm.cfg, seed=r.seed + BASE_SEED_OFFSET, tokenizer=dm.tokenizer)
    bdm._tokens = dm._tokens  # the same corpora; only the data order differs
    rec = train_loop(model, r, r.optim, r.fleet.base_steps, bdm, None, 1, [], None)
    if rec["diverged_at"] is not None:
        raise ConfigError(f"fleet: the base model diverged at step {rec['diverged_at']}")
    tokens = r.fleet.base_steps * r.data.batch_size * r.data.seq_len
    flops = tokens * train_flops_per_token(model.config, r.data.seq_len)
    meta = make_meta(kind="dense", tokens_seen=tokens, train_flops=flops,
                     recipe=dataclasses.asdict(r))  # fmt: skip
    save_checkpoint(path, model.state_dict(), model.config, meta, overwrite=True,
                    tokenizer=dm.tokenizer)
    info = {"steps": r.fleet.base_steps, "tokens": tokens, "train_flops": flops,
            "wall_s": time.time() - t0, "final_train_loss": rec["train_loss"][-1]}  # fmt: skip
    write_json(out / "base.json", info)
    return path, info


# ----------------------------------------------------------------------------- kind: sizes


def finetune(r: Recipe, base, domain: str, seed: int, dm: DomainDataModule, path: Path) -> Path:
    """Fine-tune the base on one domain's stream; a checkpoint of family `domain`."""
    if (path / "meta.json").is_file():
        return path
    data = dataclasses.replace(r.data, domains=[domain], stream="separate", weights={})
    fdm = DomainDataModule(data, seed=seed, tokenizer=dm.tokenizer)
    fdm._tokens = {domain: dm.tokens(domain)}
    model = Transformer.from_state(base.config, base.state_dict)
    rec = train_loop(model, r, _optim(r), r.fleet.steps, fdm, None, 1, [], None)
    if rec["diverged_at"] is not None:
        raise ConfigError(f"fleet: the {domain} fine-tune diverged at step {rec['diverged_at']}")
    tokens = r.fleet.steps * r.data.batch_size * r.data.seq_len
    flops = tokens * train_flops_per_token(model.config, r.data.seq_len)
    meta = make_meta(parents=[base.meta["id"]], base_id=base.meta["base_id"], family=domain,
                     domain=domain, kind="branch",
                     tokens_seen=base.meta["tokens_seen"] + tokens,
                     train_flops=base.meta["train_flops"] + flops,
                     train_recipe=base.meta.get("recipe"))  # fmt: skip
    save_checkpoint(path, model.state_dict(), model.config, meta, overwrite=True,
                    tokenizer=dm.tokenizer)
    return path


def run_sizes(r: Recipe, seeds: int, out: Path, dm: DomainDataModule, heldout: HeldOut,
              base_path: Path) -> list[dict]:  # fmt: skip
    base = load_checkpoint(base_path)
    base_bpb = heldout.bpb(Transformer.from_state(base.config, base.state_dict))
    runs = []
    for d in r.fleet.domains:
        for i in range(seeds):
            seed = r.seed + i

            def one(d=d, seed=seed) -> dict:
                ft_path = finetune(r, base, d, seed, dm, out / "finetunes" / f"{d}-seed{seed}")
                ddir = out / "deltas" / f"{d}-seed{seed}"
                lossless = ddir / "lossless.delta.safetensors"
                info = ops.extract(base_path, ft_path, lossless, overwrite=True)
                rows = [_row("lossless", info, base, read_delta(lossless), heldout)]
                for m in tqdm(r.fleet.methods, desc=f"deltas {d} seed {seed}", unit="method",
                              leave=False, file=sys.stderr, disable=not sys.stderr.isatty()):
                    dst = ddir / f"{slug(m)}.delta.safetensors"
                    info = ops.compress(lossless, m, dst, seed=seed, overwrite=True)
                    rows.append(_row(m, info, base, read_delta(dst), heldout))
                return {"domain": d, "seed": seed, "base_bpb": base_bpb, "rows": rows,
                        "params": info["parameters"]}  # fmt: skip

            runs.append(cached_run(
                out, f"sizes-{d}-seed{seed}", one, "fleet sizes",
                lambda rec, d=d: f"fine-tune {rec['rows'][0]['bpb'][d]:.4f} bpb on {d} "
                f"(base {base_bpb[d]:.4f}); {len(rec['rows'])} deltas"))  # fmt: skip
    return runs


def _row(method: str, info: dict, base, delta, heldout: HeldOut) -> dict:
    state = {n: ops.apply_tensor(t, delta.dense(n)) for n, t in base.state_dict.items()}
    return {"method": method, "bytes": info["bytes"], "payload_bytes": info["payload_bytes"],
            "density": info["density"],
            "bpb": heldout.bpb(Transformer.from_state(base.config, state))}


# ----------------------------------------------------------------------------- kind: fleet


def run_fleets(r: Recipe, seeds: int, out: Path, dm: DomainDataModule, heldout: HeldOut,
               base_path: Path) -> list[dict]:  # fmt: skip
    f = r.fleet
    base = load_checkpoint(base_path)
    runs = []
    for text in f.arms:
        arm = parse_arm(text, f.replicas, [f.domains[0]])
        for i in range(seeds):
            seed = r.seed + i
            name = f"fleet-{slug(arm.label)}-seed{seed}"

            def one(arm=arm, seed=seed, name=name) -> dict:
                spec = FleetSpec(init=base.state_dict, config=base.config, optim=_optim(r),
                                 steps=f.steps, batch_size=r.data.batch_size, seed=seed,
                                 eval_every=f.eval_every, outer_lr=f.outer_lr,
                                 outer_momentum=f.outer_momentum,
                                 checkpoint_every=f.checkpoint_every)  # fmt: skip
                state = out / "state" / f"{name}.pt"

                def score(th, base=base):
                    return heldout.bpb(Transformer.from_state(base.config, th))

                rec = run_fleet(arm, spec, dm, score, state_path=state)
                rec.pop("final")
                tokens = f.steps * arm.replicas * r.data.batch_size * r.data.seq_len
                rec.update(seed=seed, replicas=arm.replicas, H=1 if arm.sync else arm.H, S=arm.S,
                           compression="dense gradients" if arm.sync else arm.compression,
                           outer=arm.outer, families=list(arm.families), exchange=arm.exchange,
                           sync=arm.sync, tokens=tokens,
                           train_flops=tokens * train_flops_per_token(base.config,
                                                                      r.data.seq_len))  # fmt: skip
                # its record is written by cached_run before the resume state goes: a kill in
                # between redoes nothing
                return rec

            runs.append(cached_run(out, name, one, "fleet", _fleet_summary))
            (out / "state" / f"{name}.pt").unlink(missing_ok=True)
    return runs


def _fleet_summary(rec: dict) -> str:
    fin = rec["bpb"][-1]
    return ("final bpb " + ", ".join(f"{g}: {v[g.split('+')[0]]:.4f}" for g, v in fin.items())
            + f", {rec['bytes_total'] / 1e6:.2f} MB sent")  # fmt: skip


# ----------------------------------------------------------------------------- `moe run` entry


def run_delta_study(r: Recipe, seeds: int | None = None, recipe_path: str | None = None) -> Path:
    f = r.fleet
    seeds = f.seeds if seeds is None else seeds
    check(r, seeds)
    out = Path(r.out_dir)  # emptied by --overwrite in moe.experiments.experiment_dir
    (out / "runs").mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    dm = DomainDataModule(r.data, seed=r.seed)
    dm.setup()
    heldout = HeldOut(dm, list(r.data.domains), f.eval_batches, r.eval.batch_size)
    base_path, base_info = base_model(r, out, dm)
    if f.kind == "sizes":
        runs = run_sizes(r, seeds, out, dm, heldout, base_path)
    else:
        runs = run_fleets(r, seeds, out, dm, heldout, base_path)
    from moe.experiments.fleet.report import write_report

    return write_report(r, runs, base_info, out, seeds, recipe_path, time.time() - t_start)


def plan(r: Recipe, seeds: int | None = None) -> str:
    f = r.fleet
    n = f.seeds if seeds is None else seeds
    check(r, n)
    if f.kind == "sizes":
        return (f"delta sizes {r.name}: base {f.base_steps} steps; then {len(f.domains)} domains "
                f"x {n} seeds = {len(f.domains) * n} fine-tunes of {f.steps} steps, each delta "
                f"compressed {len(f.methods)} ways ({', '.join(f.methods)})")
    return (f"fleet {r.name}: base {f.base_steps} steps; then {len(f.arms)} arms x {n} seeds, "
            f"{f.steps} local steps per replica (arms: {'; '.join(f.arms)})")


def run(r: Recipe, seeds: int | None = None, recipe_path: str | None = None) -> Path:
    return run_delta_study(r, seeds=seeds, recipe_path=recipe_path)
