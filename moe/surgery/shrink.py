"""`moe shrink`: a smaller model cut from a checkpoint, optionally healed by brief training.

Depth:
    --drop-layers 3,5     delete these layers
    --bi-layers N         delete the N layers of lowest Block Influence (ShortGPT: 1 - mean
                          cosine of a block's input and output; moe/surgery/influence.py) on
                          calibration batches of the train split of --by DOMAIN (or all)
Width (fractions removed, per layer; moe/surgery/structure.py does the tensor work):
    --ffn F               FFN neurons (each expert's, for an MoE)
    --heads F             key/value head groups (with their query heads), head_dim unchanged
    --channels F          model-dim channels (the same set in the whole residual stream)
    --select random|magnitude
                          which units go: at random (seeded), or those of smallest weight norm
                          (FFN neuron j: |w1_j|·|w3_j|·|w2_j|; head group: |wv rows|·|wo cols|;
                          channel: the norm of every weight reading or writing it)
Healing: --heal-steps N trains the cut model N steps (a normal `moe train` stage, stage dense or
joint, on the checkpoint's own data recipe; key=value overrides change it). Then --out is a run
directory: OUT/cut is the cut checkpoint and OUT/model the healed one; the same command run
again resumes the healing where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from moe.config import ConfigError, ModelConfig
from moe.surgery.structure import ffn_hidden, head_dim, keep_ffn, keep_width, select_layers

SELECT = ("random", "magnitude")


@dataclass
class ShrinkSpec:
    drop_layers: list[int] | None = None
    bi_layers: int = 0
    by: str = "all"  # calibration domain for Block Influence, or all
    calib_batches: int = 8
    ffn: float = 0.0
    heads: float = 0.0
    channels: float = 0.0
    select: str = "magnitude"
    seed: int = 0

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def _count(frac: float, n: int, what: str) -> int:
    """How many of n units a fraction removes; refuses fractions that remove all of them."""
    if not 0.0 <= frac < 1.0:
        raise ConfigError(f"shrink --{what} {frac}: the fraction removed must be in [0, 1)")
    k = round(frac * n)
    if k >= n:
        raise ConfigError(f"shrink --{what} {frac}: removes every one of the {n} {what} of a "
                          "layer; keep at least one")  # fmt: skip
    return k


def check_spec(cfg: ModelConfig, s: ShrinkSpec) -> None:
    if s.select not in SELECT:
        raise ConfigError(f"shrink --select: {s.select!r}; choose one of {', '.join(SELECT)}")
    n = cfg.n_layers
    drop = list(s.drop_layers or [])
    bad = [i for i in drop if not 0 <= i < n]
    if bad:
        raise ConfigError(f"shrink --drop-layers: layer {bad[0]} out of range (the model has "
                          f"{n} layers, 0..{n - 1})")  # fmt: skip
    if len(set(drop)) != len(drop):
        raise ConfigError("shrink --drop-layers: a layer is listed twice")
    if s.bi_layers < 0:
        raise ConfigError(f"shrink --bi-layers {s.bi_layers}: must be >= 0")
    if len(set(drop)) + s.bi_layers >= n:
        raise ConfigError(f"shrink: removing {len(set(drop)) + s.bi_layers} of {n} layers "
                          "leaves no layer; keep at least one")  # fmt: skip
    if s.calib_batches < 1:
        raise ConfigError("shrink --calib-batches must be >= 1")
    _count(s.ffn, ffn_hidden(cfg), "ffn")
    _count(s.heads, cfg.n_kv_heads, "heads")
    _count(s.channels, cfg.dim, "channels")
    if not (drop or s.bi_layers or s.ffn or s.heads or s.channels):
        raise ConfigError("shrink: nothing to do; give --drop-layers, --bi-layers, --ffn, "
                          "--heads or --channels")  # fmt: skip


# ----------------------------------------------------------------------------- scores


def ffn_scores(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> list[list[torch.Tensor]]:
    """[layer][expert] -> (F,) magnitude of each neuron: |w1_j| |w3_j| |w2_j|."""
    out = []
    for i in range(cfg.n_layers):
        p = f"layers.{i}.ffn."
        if cfg.moe.experts:
            w1, w3, w2 = sd[p + "w1"], sd[p + "w3"], sd[p + "w2"]  # (E,C,F) (E,C,F) (E,F,C)
            out.append([w1[e].norm(dim=0) * w3[e].norm(dim=0) * w2[e].norm(dim=1)
                        for e in range(w1.shape[0])])  # fmt: skip
        else:
            w1, w3 = sd[p + "w1.weight"], sd[p + "w3.weight"]  # (F, C)
            w2 = sd[p + "w2.weight"]  # (C, F)
            out.append([w1.norm(dim=1) * w3.norm(dim=1) * w2.norm(dim=0)])
    return out


def head_scores(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """[layer] -> (Hkv,) magnitude of each key/value group: |wv rows| |wo columns|."""
    hd, g = head_dim(cfg), cfg.n_heads // cfg.n_kv_heads
    out = []
    for i in range(cfg.n_layers):
        wv = sd[f"layers.{i}.attn.wv.weight"].view(cfg.n_kv_heads, hd, -1)  # (Hkv, Dh, C)
        wo = sd[f"layers.{i}.attn.wo.weight"].view(-1, cfg.n_kv_heads, g * hd)  # (C, Hkv, g*Dh)
        out.append(wv.flatten(1).norm(dim=1) * wo.transpose(0, 1).flatten(1).norm(dim=1))
    return out


def channel_scores(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """(C,) the norm of every weight reading or writing each model-dim channel."""
    sq = torch.zeros(cfg.dim, dtype=torch.float64)
    for name, t in sd.items():
        if name.endswith("norm.weight") or name.endswith(".bias"):
            continue
        t = t.double()
        if name.endswith("ffn.w2"):  # (E, F, C)
            sq += t.pow(2).sum((0, 1))
        elif name.endswith(("ffn.w1", "ffn.w3")):  # (E, C, F)
            sq += t.pow(2).sum((0, 2))
        elif name.endswith(("wo.weight", "w2.weight")):  # (C, in)
            sq += t.pow(2).sum(1)
        else:  # (out, C): embeddings, head, q/k/v, w1/w3, router
            sq += t.pow(2).sum(0)
    return sq.sqrt()


def _keep(scores: torch.Tensor, n_drop: int, select: str, gen: torch.Generator) -> list[int]:
    n = scores.numel()
    if select == "random":
        order = torch.randperm(n, generator=gen)
    else:
        order = torch.argsort(scores, stable=True)  # smallest first
    return sorted(order[n_drop:].tolist())


def shrink_state(cfg: ModelConfig, sd: dict[str, torch.Tensor], s: ShrinkSpec,
                 bi: list[float] | None = None) -> tuple[ModelConfig, dict, dict]:  # fmt: skip
    """(config, state dict, record of what was removed). `bi`: per-layer Block Influence, needed
    with --bi-layers."""
    check_spec(cfg, s)
    gen = torch.Generator().manual_seed(s.seed)
    rec: dict = {}
    drop = set(s.drop_layers or [])
    if s.bi_layers:
        if bi is None or len(bi) != cfg.n_layers:
            raise ConfigError("shrink --bi-layers needs the Block Influence of every layer")
        rank = [i for i in sorted(range(cfg.n_layers), key=lambda i: bi[i]) if i not in drop]
        drop |= set(rank[: s.bi_layers])
        rec["block_influence"] = list(bi)
    if s.ffn:
        k = _count(s.ffn, ffn_hidden(cfg), "ffn")
        keep = [[_keep(sc, k, s.select, gen) for sc in lay] for lay in ffn_scores(cfg, sd)]
        cfg, sd = keep_ffn(cfg, sd, keep if cfg.moe.experts else [lay[0] for lay in keep])
        rec["ffn_kept"] = ffn_hidden(cfg)
    kv = ch = None
    if s.heads:
        k = _count(s.heads, cfg.n_kv_heads, "heads")
        kv = [_keep(sc, k, s.select, gen) for sc in head_scores(cfg, sd)]
        rec["kv_groups_kept"] = kv
    if s.channels:
        k = _count(s.channels, cfg.dim, "channels")
        ch = _keep(channel_scores(cfg, sd), k, s.select, gen)
        rec["channels_kept"] = len(ch)
    if kv is not None or ch is not None:
        cfg, sd = keep_width(cfg, sd, channels=ch, kv_groups=kv)
    if drop:
        rec["layers_removed"] = sorted(drop)
        cfg, sd = select_layers(cfg, sd, [i for i in range(cfg.n_layers) if i not in drop])
    return cfg, sd, rec


# ----------------------------------------------------------------------------- calibration


def calibration_batches(data, tokenizer, seed: int, by: str, n: int, batch_size: int,
                        experts: list[str], router: str) -> list[dict]:  # fmt: skip
    """`n` batches per domain from the train split (never the held-out documents the shrunk
    model is evaluated on), with `domain` as the model takes it (expert ids for a domain-routed
    MoE, else None)."""
    from torch.utils.data import DataLoader

    from moe.data.datamodule import DomainDataModule
    from moe.data.streams import CollateHeldout, HeldoutSequences

    doms = list(data.domains) if by == "all" else [by]
    dm = DomainDataModule(dataclasses.replace(data, domains=doms), seed=seed, tokenizer=tokenizer)
    hard = bool(experts) and router == "domain"
    out = []
    for d in doms:
        if hard and d not in experts:
            raise ConfigError(f"shrink --by {d}: the domain-routed MoE has no expert for it")
        seqs = dm.sequences(d, "train")
        loader = DataLoader(HeldoutSequences(seqs, n * batch_size), batch_size=batch_size,
                            collate_fn=CollateHeldout())  # fmt: skip
        for b in loader:
            dom = torch.full((b["input_ids"].shape[0],), experts.index(d)) if hard else None
            out.append({"input_ids": b["input_ids"], "domain": dom})
    if not out:
        raise ConfigError(f"shrink --by {by}: no calibration sequences")
    return out


def block_influence_of(model, data, tokenizer, seed: int, by: str, n: int,
                       batch_size: int = 8) -> list[float]:  # fmt: skip
    from moe.surgery.influence import block_influence

    m = model.config.moe
    return block_influence(model, calibration_batches(data, tokenizer, seed, by, n, batch_size,
                                                      list(m.experts), m.router))  # fmt: skip


# ----------------------------------------------------------------------------- the command


def shrink_checkpoint(source: str | Path, out: str | Path, spec: ShrinkSpec,
                      heal_steps: int = 0, overrides: list[str] | None = None,
                      overwrite: bool = False) -> Path:  # fmt: skip
    """`moe shrink`. Without healing `out` is the cut checkpoint; with healing a run directory
    (OUT/cut, then OUT/model), resumed when run again with the same arguments."""
    from moe.data.tokenizer import checkpoint_tokenizer
    from moe.eval.evaluate import data_config_of, resolve_checkpoint
    from moe.io.checkpoint import CheckpointError, is_checkpoint, load_checkpoint, read_meta
    from moe.io.output import claim
    from moe.model.transformer import Transformer
    from moe.surgery.grow import write_surgery_checkpoint

    if heal_steps < 0:
        raise ConfigError(f"shrink --heal-steps {heal_steps}: must be >= 0")
    if overrides and not heal_steps:
        raise ConfigError("shrink: key=value overrides configure the healing; give --heal-steps")
    src_dir = resolve_checkpoint(source)
    out = Path(out)
    cut = out / "cut" if heal_steps else out
    record = dict(spec.describe(), heal_steps=heal_steps, overrides=list(overrides or []))
    reuse = False
    if out.exists() and not overwrite:
        prev = read_meta(cut).get("recipe", {}).get("shrink") if is_checkpoint(cut) else None
        same = prev is not None and {k: v for k, v in prev.items() if k not in (
            "source", "removed")} == record and prev.get("source") == str(src_dir)  # fmt: skip
        if not (heal_steps and same):
            raise CheckpointError(f"{out} already exists (pass --overwrite to replace it)")
        reuse = True  # the same command again: resume its healing
    with claim(out, [source]):  # moe/io/output.py (the healing stage's own claim is this one)
        ck = load_checkpoint(src_dir)
        data, seed = data_config_of(ck.meta)
        check_spec(ck.config, spec)
        heal = _heal_recipe(ck, cut, out, data, seed, heal_steps, overrides) if heal_steps else None
        if not reuse:
            bi = None
            if spec.bi_layers:
                if spec.by != "all" and spec.by not in data.domains:
                    raise ConfigError(f"shrink --by {spec.by}: not one of the checkpoint's domains "
                                      f"({', '.join(data.domains)})")  # fmt: skip
                model = Transformer.from_state(ck.config, ck.state_dict)
                tok = checkpoint_tokenizer(src_dir, ck.config.vocab_size)
                bi = block_influence_of(model, data, tok, seed, spec.by, spec.calib_batches)
            cfg, sd, removed = shrink_state(ck.config, ck.state_dict, spec, bi)
            if heal_steps and overwrite and out.exists():
                shutil.rmtree(out)
            write_surgery_checkpoint(src_dir, ck, cfg, sd, cut, "shrink",
                                     dict(record, removed=removed), overwrite)  # fmt: skip
        if heal is None:
            return cut
        return run_stage(out, heal)


def run_stage(out: Path, stage) -> Path:
    """Train the recipe `stage` into the run directory `out` (final model out/model): resumed
    from out's own Lightning checkpoint when a previous run stopped, skipped when it finished."""
    from moe.io.checkpoint import atomic_write_text, is_checkpoint
    from moe.train.stages import train

    if is_checkpoint(out / "model") and (out / "stage.json").is_file():
        return out / "model"  # finished before
    resume = (out / "resume" / "last.ckpt").is_file()
    stage = dataclasses.replace(stage, resume=str(out) if resume else None, overwrite=not resume)
    final = train(stage)
    steps = stage.trainer.max_steps
    atomic_write_text(out / "stage.json", json.dumps({"steps": steps, "model": str(final)}) + "\n")
    return final


def _heal_recipe(ck, cut: Path, out: Path, data, seed: int, steps: int, overrides,
                 what: str = "shrink healing"):  # fmt: skip
    """A training stage as a recipe: the source's data, `cut` as init, `steps` steps."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from moe.config import Recipe, parse_override, to_dict, validate

    base = OmegaConf.structured(Recipe)
    moe = bool(ck.config.moe.experts)
    d = {"name": f"heal-{out.name}", "stage": "joint" if moe else "dense", "seed": seed,
         "out_dir": str(out), "init": str(cut), "data": to_dict(data),
         "trainer": {"max_steps": steps, "val_check_interval": max(steps, 1),
                     "checkpoint_every_n_steps": max(1, min(50, steps))}}  # fmt: skip
    try:
        merged = OmegaConf.merge(base, d, *[parse_override(ov) for ov in overrides or []])
        r: Recipe = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(f"{what} override: {str(e).splitlines()[0]}") from None
    r.model = ck.config
    validate(r, what)
    return r
