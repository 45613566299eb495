"""A simulated fleet: replicas of one expert family exchanging compressed deltas (one process).

R replicas start from the same model and train on disjoint shards of their family's training
stream (replica r gets sequences r, r + R, r + 2R, ... of it), each with its own AdamW state.
Every H local steps (a round), each replica sends its delta: its progress during the round
(θ_r − θ_r at the round's start), encoded by the arm's compression spec; the bytes sent are
the encoded delta's exact serialized size (`format.to_bytes`). A coordinator per exchange group
combines the decoded deltas Δ̂_r of its replicas:

    average    θ_g ← θ_g + mean_r Δ̂_r
    nesterov   g = −mean_r Δ̂_r; m ← μ m + g; θ_g ← θ_g − lr (g + μ m)    (DiLoCo's outer step,
               Douillard et al. 2023, arXiv:2311.08105; lr 0.7, μ 0.9 there)

and the new θ_g reaches the group's replicas S rounds later (staleness): until it arrives each
replica keeps training its own model. On arrival (`arrive=replace`, the default) it replaces its
model by that θ_g, keeping its optimizer state: its progress in the rounds in between was sent
in those rounds, so it reaches θ_g S rounds late (a parameter server's stale pull). With
`arrive=rebase` it keeps that in-flight progress: θ_r ← θ_g + (θ_r − θ_r at the send θ_g
answers). With S = 0 both are the same. The fleet's model is each group's θ_g, evaluated at
round ends.

A group is a family ("within": text replicas merge with text replicas only) or the whole fleet
("cross": text and DNA replicas average their deltas into one model).

The synchronous baseline trains one model on the concatenated batches of all R shards (batch
R × B) for the same number of steps: the same training FLOPs, data-parallel SGD.

Error feedback (`ef=1`, Seide et al. 2014; Karimireddy et al. 2019): a replica adds what its
previous messages' compression dropped to its next delta before compressing it, and keeps what
this one drops, so every update is eventually sent (Σ sent + residual = Σ raw deltas).

All state (models, optimizer and schedule states, round references, coordinator models,
momentum, in-flight updates, counters) is saved every `checkpoint_every` local steps at a round
end, so a killed run resumes to the same result as an uninterrupted one. Exactness: with R = 1,
H = 1, average, S = 0 and the lossless (float64) delta, the fleet is plain training bit for bit.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from moe.config import ConfigError, OptimConfig
from moe.data.datamodule import DomainDataModule
from moe.data.streams import PackedSequences, draw_index, make_batch
from moe.delta.format import Delta, compress_tensors, decode, lossless_tensors, to_bytes
from moe.delta.registry import parse_spec
from moe.model.transformer import Transformer
from moe.train.loop import make_optimizer, train_steps

OUTERS = ("average", "nesterov")
EXCHANGES = ("within", "cross")
ARRIVALS = ("replace", "rebase")


@dataclass(frozen=True)
class Arm:
    """One fleet configuration. Text form: `R=4 H=8 S=0 c=topk:0.1+int8 outer=average
    fam=text x=within`, or `sync R=4 fam=text` for the synchronous baseline."""

    label: str
    replicas: int = 4
    H: int = 8
    S: int = 0
    compression: str = "none"  # a compression spec, or "lossless" (float64, exact)
    outer: str = "average"
    families: tuple[str, ...] = ("text",)
    exchange: str = "within"
    arrive: str = "replace"  # what a replica does with a model that arrives (see module doc)
    ef: bool = False  # error feedback: what compression dropped joins the next delta
    sync: bool = False


def parse_arm(text: str, replicas: int, families: list[str]) -> Arm:
    """Parse an arm; defaults from the recipe (replicas, families). Errors name the bad part."""
    kw: dict = {"replicas": replicas, "families": tuple(families)}
    words = str(text).split()
    if not words:
        raise ConfigError("fleet.arms: an empty arm")
    for w in words:
        if w == "sync":
            kw["sync"] = True
            continue
        k, eq, v = w.partition("=")
        if not eq:
            raise ConfigError(f"fleet.arms: {text!r}: {w!r} is not KEY=VALUE (keys R, H, S, c, "
                              "outer, fam, x, arrive, ef) or 'sync'")
        if k in ("R", "H", "S"):
            try:
                kw[{"R": "replicas", "H": "H", "S": "S"}[k]] = int(v)
            except ValueError:
                raise ConfigError(f"fleet.arms: {text!r}: {k} must be a whole number, got {v!r}"
                                  ) from None
        elif k == "c":
            if v != "lossless":
                parse_spec(v)
            kw["compression"] = v
        elif k == "outer":
            kw["outer"] = v
        elif k == "fam":
            kw["families"] = tuple(v.split(","))
        elif k == "x":
            kw["exchange"] = v
        elif k == "arrive":
            kw["arrive"] = v
        elif k == "ef":
            if v not in ("0", "1"):
                raise ConfigError(f"fleet.arms: {text!r}: ef is 0 or 1, got {v!r}")
            kw["ef"] = v == "1"
        else:
            raise ConfigError(f"fleet.arms: {text!r}: unknown key {k!r} (R, H, S, c, outer, "
                              "fam, x, arrive, ef)")
    arm = Arm(label=" ".join(words), **kw)
    if arm.replicas < 1:
        raise ConfigError(f"fleet.arms: {text!r}: R (replicas) must be >= 1, got {arm.replicas}")
    if arm.H < 1:
        raise ConfigError(f"fleet.arms: {text!r}: H (local steps per round) must be >= 1, got "
                          f"{arm.H}")
    if arm.S < 0:
        raise ConfigError(f"fleet.arms: {text!r}: S (staleness in rounds) must be >= 0")
    if arm.outer not in OUTERS:
        raise ConfigError(f"fleet.arms: {text!r}: outer must be one of {', '.join(OUTERS)}")
    if arm.arrive not in ARRIVALS:
        raise ConfigError(f"fleet.arms: {text!r}: arrive must be one of {', '.join(ARRIVALS)}")
    if arm.exchange not in EXCHANGES:
        raise ConfigError(f"fleet.arms: {text!r}: x must be one of {', '.join(EXCHANGES)}")
    if arm.replicas % len(arm.families):
        raise ConfigError(f"fleet.arms: {text!r}: R={arm.replicas} replicas do not split evenly "
                          f"over families {','.join(arm.families)}")
    return arm


# ----------------------------------------------------------------------------- data shards


class Shard:
    """Replica r's disjoint share of one domain's training sequences (every R-th from r)."""

    def __init__(self, seqs: PackedSequences, r: int, R: int, seed: int):
        self.seqs, self.r, self.R, self.seed = seqs, r, R, seed
        self.n = len(range(r, len(seqs), R))
        if self.n == 0:
            raise ConfigError(f"fleet: {R} shards of {len(seqs)} training sequences leave shard "
                              f"{r} empty; use fewer replicas or more data")

    def batch(self, i: int, B: int) -> dict[str, torch.Tensor]:
        """Batch i: the same draw rule as the `separate` stream (moe.data.streams.TrainBatches),
        over the shard's sequences; with R = 1 it is that stream's batch i exactly."""
        d = self.seqs.domain_id
        rows = [self.seqs.item(self.r + self.R * draw_index(self.seed, d, k, self.n))
                for k in range(i * B, (i + 1) * B)]  # fmt: skip
        return make_batch(rows, [d] * B)


# ----------------------------------------------------------------------------- the fleet


@dataclass
class Member:
    """A trained model with its own optimizer (a replica, or the synchronous model)."""

    model: Transformer
    domain_names: list[str]  # the data's domain ids' names (a domain router's experts)
    opt: torch.optim.Optimizer
    sched: object
    family: str
    shards: list[Shard]
    ref: dict[str, torch.Tensor] = field(default_factory=dict)  # θ at the round's start
    residual: dict[str, torch.Tensor] = field(default_factory=dict)  # error feedback (float64)

    def send(self, delta: dict[str, torch.Tensor], compression: str, seed: int, ef: bool
             ) -> tuple[dict[str, torch.Tensor], int]:  # fmt: skip
        """Encode this round's delta (float64); with error feedback, what earlier messages
        dropped is added first and what this one drops is kept for the next."""
        if ef and self.residual:
            delta = {n: t + self.residual[n] for n, t in delta.items()}
        dec, nbytes = encode_delta(delta, compression, seed)
        if ef:
            self.residual = {n: delta[n] - dec[n] for n in delta}
        return dec, nbytes

    def batch(self, i: int, B: int) -> dict[str, torch.Tensor]:
        """Batch i: each shard's batch i (the synchronous model: all of them, concatenated)."""
        if len(self.shards) == 1:
            return self.shards[0].batch(i, B)
        return _concat([s.batch(i, B) for s in self.shards])

    def local_steps(self, start: int, steps: int, B: int, grad_clip: float,
                    on_step: Callable[[int], None] | None) -> list[float]:  # fmt: skip
        """Local steps start .. start + steps - 1 (moe.train.loop); their losses."""
        done = train_steps(self.model, self.opt, lambda i: self.batch(i, B), steps,
                           sched=self.sched, domain_names=self.domain_names, grad_clip=grad_clip,
                           start=start, on_step=on_step)  # fmt: skip
        if done.diverged_at is not None:
            raise ConfigError(f"fleet: the training loss became {done.bad_loss} at step "
                              f"{done.diverged_at}")  # fmt: skip
        return done.losses


def _concat(batches: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _member(init: dict[str, torch.Tensor], config, optim: OptimConfig, steps: int,
            dm: DomainDataModule, family: str, shards: list[Shard]) -> Member:  # fmt: skip
    model = Transformer.from_state(config, init)
    model.train()
    opt, sched = make_optimizer(model, optim, steps)
    return Member(model, list(dm.domain_names), opt, sched, family, shards)


def _state(model: Transformer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _seed(*key) -> int:
    h = hashlib.sha256("\0".join(map(str, key)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 62) - 1)


def encode_delta(delta: dict[str, torch.Tensor], compression: str, seed: int
                 ) -> tuple[dict[str, torch.Tensor], int]:  # fmt: skip
    """(decoded Δ̂ in float64, exact bytes of the encoded message) for one replica's delta."""
    if compression == "lossless":
        stored, descs = lossless_tensors(delta)
    else:
        stored, descs = compress_tensors(delta, compression, seed=seed)
    nbytes = len(to_bytes(Delta({"method": compression, "tensors": descs}, stored)))
    return {n: decode(n, descs[n], stored) for n in delta}, nbytes


@dataclass
class Group:
    """One coordinator: the model θ_g its replicas share, and its outer optimizer state."""

    family: str  # a family, or "+".join(families) for a cross-family group
    members: list[int]
    theta: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] | None = None
    # in flight: (arrival round, θ_g, each member's model right after its send)
    pending: list[tuple[int, dict, list[dict]]] = field(default_factory=list)

    def update(self, deltas: list[dict[str, torch.Tensor]], arm: Arm, lr: float, mu: float
               ) -> None:  # fmt: skip
        mean = {n: sum(d[n] for d in deltas) / len(deltas) for n in self.theta}
        if arm.outer == "average":
            self.theta = {n: (t.double() + mean[n]).to(t.dtype) for n, t in self.theta.items()}
            return
        if self.momentum is None:
            self.momentum = {n: torch.zeros_like(m) for n, m in mean.items()}
        new = {}
        for n, t in self.theta.items():
            g = -mean[n]  # the outer gradient (float64)
            self.momentum[n] = mu * self.momentum[n] + g
            new[n] = (t.double() - lr * (g + mu * self.momentum[n])).to(t.dtype)
        self.theta = new


@dataclass
class FleetSpec:
    """What a fleet run needs besides the arm (moe/experiments/fleet/study.py makes it)."""

    init: dict[str, torch.Tensor]
    config: object  # ModelConfig
    optim: OptimConfig
    steps: int  # local steps per replica (a multiple of H)
    batch_size: int
    seed: int
    eval_every: int
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    checkpoint_every: int = 64


def run_fleet(arm: Arm, spec: FleetSpec, dm: DomainDataModule, evaluate: Callable | None,
              state_path: str | os.PathLike | None = None,
              on_step: Callable[[int], None] | None = None) -> dict:  # fmt: skip
    """Run (or resume from `state_path`) one arm; returns its record (curve, bytes, finals)."""
    if not arm.sync and spec.steps % arm.H:
        raise ConfigError(f"fleet: steps ({spec.steps}) must be a multiple of H ({arm.H}) in "
                          f"arm {arm.label!r}")
    R, B = arm.replicas, spec.batch_size
    per_fam = R // len(arm.families)
    members: list[Member] = []
    if arm.sync:
        for fam in arm.families:
            seqs = dm.sequences(fam, "train")
            shards = [Shard(seqs, r, per_fam, spec.seed) for r in range(per_fam)]
            members.append(_member(spec.init, spec.config, spec.optim, spec.steps, dm, fam,
                                   shards))
    else:
        for fam in arm.families:
            seqs = dm.sequences(fam, "train")
            for r in range(per_fam):
                members.append(_member(spec.init, spec.config, spec.optim, spec.steps, dm, fam,
                                       [Shard(seqs, r, per_fam, spec.seed)]))
    if arm.sync or arm.exchange == "within":
        groups = [Group(f, [i for i, m in enumerate(members) if m.family == f], dict(spec.init))
                  for f in arm.families]  # fmt: skip
    else:
        groups = [Group("+".join(arm.families), list(range(len(members))), dict(spec.init))]
    n_params = sum(t.numel() for t in spec.init.values())
    rec: dict = {"arm": arm.label, "eval_steps": [], "bpb": [], "bytes_up": [], "rounds": 0,
                 "train_loss": [], "wall_s": 0.0}  # fmt: skip
    bytes_up, rnd = 0, 0
    if state_path is not None and Path(state_path).is_file():
        st = torch.load(state_path, weights_only=True)
        for m, s in zip(members, st["members"]):
            m.model.load_state_dict(s["model"])
            m.opt.load_state_dict(s["opt"])
            m.sched.load_state_dict(s["sched"])
            m.ref = s["ref"]
            m.residual = s.get("residual", {})
        for g, s in zip(groups, st["groups"]):
            g.theta, g.momentum = s["theta"], s["momentum"]
            g.pending = [(int(a), t, sn) for a, t, sn in zip(s["arrive"], s["pending"],
                                                             s["snapshots"])]
        rec, bytes_up, rnd = st["rec"], int(st["bytes_up"]), int(st["round"])
    t0 = time.time() - rec["wall_s"]
    H = 1 if arm.sync else arm.H
    rounds = spec.steps // H
    last_ckpt = rnd * H
    if rnd == 0:
        for m in members:
            m.ref = _state(m.model)
        _observe(rec, 0, groups, evaluate, bytes_up, spec.eval_every, force=True)
    bar = tqdm(total=rounds, initial=rnd, desc=f"fleet {arm.label}", unit="round", leave=False,
               file=sys.stderr, disable=not sys.stderr.isatty())
    while rnd < rounds:
        losses = []
        for m in members:
            losses += m.local_steps(rnd * H, H, B, spec.optim.grad_clip, on_step)
        rec["train_loss"].append(sum(losses) / len(losses))
        if arm.sync:
            for g in groups:  # the one model of each family is the coordinator's model
                g.theta = _state(members[g.members[0]].model)
            # data-parallel all-reduce: each of R workers sends a float32 gradient per step
            bytes_up += R * 4 * n_params
        else:
            for g in groups:
                deltas, snaps = [], []
                for i in g.members:
                    m = members[i]
                    now = _state(m.model)
                    d = {n: now[n].double() - m.ref[n].double() for n in now}
                    dec, nb = m.send(d, arm.compression, _seed(spec.seed, rnd, i), arm.ef)
                    deltas.append(dec)
                    bytes_up += nb
                    m.ref = now
                    snaps.append(now if arm.arrive == "rebase" else {})
                g.update(deltas, arm, spec.outer_lr, spec.outer_momentum)
                g.pending.append((rnd + arm.S, dict(g.theta), snaps))
                arrived = [p for p in g.pending if p[0] <= rnd]
                g.pending = [p for p in g.pending if p[0] > rnd]
                if arrived:
                    _, newest, sent = arrived[-1]
                    for j, i in enumerate(g.members):
                        m = members[i]
                        if arm.arrive == "rebase":  # θ_g + own progress since that send
                            now = _state(m.model)
                            new = {n: (t.double() + now[n].double() - sent[j][n].double())
                                   .to(t.dtype) for n, t in newest.items()}  # fmt: skip
                        else:
                            new = newest
                        m.model.load_state_dict(new)
                        m.ref = {n: t.clone() for n, t in new.items()}
        rnd += 1
        bar.update()
        _observe(rec, rnd * H, groups, evaluate, bytes_up, spec.eval_every,
                 force=rnd == rounds)  # fmt: skip
        if state_path is not None and (rnd * H - last_ckpt >= spec.checkpoint_every
                                       or rnd == rounds):  # fmt: skip
            rec["wall_s"] = time.time() - t0
            _save_state(state_path, members, groups, rec, bytes_up, rnd)
            last_ckpt = rnd * H
    bar.close()
    rec["rounds"] = rounds
    rec["bytes_total"] = bytes_up
    rec["bytes_down"] = downlink_bytes(arm.sync, R, arm.S, rounds, n_params)
    rec["params"] = n_params
    rec["wall_s"] = time.time() - t0
    rec["final"] = {g.family: {k: v.clone() for k, v in g.theta.items()} for g in groups}
    return rec


def downlink_bytes(sync: bool, replicas: int, S: int, rounds: int, params: int) -> int:
    """What the replicas receive, as this simulation sends it: a dense float32 tensor set per
    replica per delivery. Sync: the all-reduced gradient every step. A fleet: the coordinator's
    model at every round an update arrives; with staleness S the last S rounds' updates never
    arrive (the run ends first)."""
    deliveries = rounds if sync else max(rounds - S, 0)
    return deliveries * replicas * 4 * params


def _observe(rec: dict, step: int, groups: list[Group], evaluate: Callable | None,
             bytes_up: int, every: int, force: bool = False) -> None:  # fmt: skip
    last = rec["eval_steps"][-1] if rec["eval_steps"] else -math.inf
    if evaluate is None or not (force or step - last >= every):
        return
    rec["eval_steps"].append(step)
    rec["bytes_up"].append(bytes_up)
    rec["bpb"].append({g.family: evaluate(g.theta) for g in groups})


def _save_state(path, members: list[Member], groups: list[Group], rec: dict, bytes_up: int,
                rnd: int) -> None:  # fmt: skip
    st = {
        "members": [{"model": _state(m.model), "opt": m.opt.state_dict(),
                     "sched": m.sched.state_dict(), "ref": m.ref, "residual": m.residual}
                    for m in members],
        "groups": [{"theta": g.theta, "momentum": g.momentum,
                    "arrive": [p[0] for p in g.pending], "pending": [p[1] for p in g.pending],
                    "snapshots": [p[2] for p in g.pending]}
                   for g in groups],
        "rec": rec, "bytes_up": bytes_up, "round": rnd,
    }  # fmt: skip
    from moe.io.checkpoint import staged_file

    with staged_file(path) as tmp:
        torch.save(st, tmp)
