"""`moe experts`: an MoE checkpoint with experts dropped, kept or added, or another top-k, written
as a new checkpoint (lineage kept) without training: FlexOlmo's opt-out, where a data owner's
expert leaves (or joins) the model. The operations on the model are moe.model.expert_subset's;
`moe eval --experts` and `moe generate --experts` apply the same in memory, writing nothing.

An added expert comes from another checkpoint of the same lineage (same base_id, same tokenizer,
same shapes): an MoE's expert by name (`NAME=CKPT:EXPERT`), or a dense branch's FFN
(`NAME=CKPT`). Its router row, for a learned router: `zero` (logit 0 for every token), or
`domain_mean`: in each layer, the unit mean of the hidden states entering the FFN over the
training batches of domain NAME (as `moe assemble --router-init domain_mean`), scaled to the mean
norm of the layer's other router rows, so it competes on their scale.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from moe.config import DOMAINS, ConfigError
from moe.data.tokenizer import carried_tokenizer, check_same_tokenizer
from moe.eval.evaluate import data_config_of
from moe.io.checkpoint import (
    load_model,
    make_meta,
    read_config,
    resolve_checkpoint,
    save_checkpoint,
)
from moe.io.output import claim
from moe.model.expert_subset import (
    add_expert,
    expert_weights,
    moe_layers,
    plan_experts,
    restrict_experts,
    set_top_k,
)
from moe.model.split import domain_mean_router
from moe.model.transformer import Transformer

ROUTER_ROWS = ("zero", "domain_mean")  # an added expert's router row


@dataclasses.dataclass
class AddSpec:
    """`--add NAME=CKPT[:EXPERT]`: expert NAME from checkpoint CKPT (its expert EXPERT, or the
    FFN of a dense CKPT)."""

    name: str
    source: str
    expert: str | None = None

    @classmethod
    def parse(cls, spec: str) -> AddSpec:
        name, eq, rest = spec.partition("=")
        if not eq or not name.strip() or not rest.strip():
            raise ConfigError(f"--add {spec!r}: expected NAME=CKPT or NAME=CKPT:EXPERT")
        source, expert = rest, None
        if not Path(rest).exists() and ":" in rest:
            source, _, expert = rest.rpartition(":")
        return cls(name.strip(), source, expert or None)


def experts_checkpoint(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    keep: list[str] | None = None,
    drop: list[str] | None = None,
    add: list[str] | None = None,
    top_k: int | None = None,
    router_row: str = "zero",
    calib_batches: int = 4,
    overwrite: bool = False,
    notes: list[str] | None = None,
) -> Path:
    """Write `out`: the MoE at `path` with `keep` (or all but `drop`) experts, then each `add`
    spec appended, with `top_k` experts per token (default: the model's, clamped to the experts
    left; the clamp is appended to `notes`). Every check (names, top-k, sources, shapes,
    lineage) runs before anything is written."""
    adds = [AddSpec.parse(s) for s in add or []]
    if keep is None and drop is None and not adds and top_k is None:
        raise ConfigError("nothing to change: give --drop, --keep, --add or --top-k")
    if router_row not in ROUTER_ROWS:
        raise ConfigError(f"--router-row must be {' or '.join(ROUTER_ROWS)}, got {router_row!r}")
    if calib_batches < 1:
        raise ConfigError(f"--calib-batches must be at least 1, got {calib_batches}")
    if Path(out).exists() and not overwrite:
        raise ConfigError(f"{out} already exists (pass --overwrite to replace it)")
    src = resolve_checkpoint(path)
    cfg = read_config(src).resolved()
    kept, k, said = plan_experts(cfg, keep, drop, top_k, added=len(adds), where=str(src))
    names = [*kept, *(a.name for a in adds)]
    if len(set(names)) != len(names):
        raise ConfigError(f"--add: an expert would be named twice ({', '.join(names)})")
    with claim(out, [path, *(a.source for a in adds)]):  # moe/io/output.py
        model, meta, _, _ = load_model(src)
        restrict_experts(model, kept, min(k, len(kept)))
        donors = []
        for a in adds:
            donor, dmeta = _donor(src, model, meta, a)
            rows = None
            if model.config.moe.router == "learned":
                rows = _router_rows(model, meta, a.name, router_row, calib_batches, src)
            add_expert(model, a.name, expert_weights(donor, a.expert), rows)
            donors.append(dict(name=a.name, source=str(a.source), expert=a.expert,
                               id=dmeta["id"], router_row=router_row))
        set_top_k(model, k)
        if notes is not None:
            notes.extend(said)
        dropped = [n for n in cfg.moe.experts if n not in kept]
        new_meta = make_meta(
            parents=[meta["id"], *(d["id"] for d in donors)],
            base_id=meta.get("base_id") or meta["id"],
            kind="moe",
            family=meta.get("family"),
            domain=meta.get("domain"),
            tokens_seen=meta.get("tokens_seen", 0),
            train_flops=meta.get("train_flops", 0.0),
            recipe=meta.get("recipe"),
            experts_edit=dict(experts=list(model.config.moe.experts), dropped=dropped,
                              added=donors, top_k=k, from_top_k=cfg.moe.top_k),
        )
        tok = carried_tokenizer(src, cfg.vocab_size)
        return save_checkpoint(out, model.state_dict(), model.config, new_meta,
                               overwrite=overwrite, tokenizer=tok)


def _donor(src: Path, model: Transformer, meta: dict, a: AddSpec) -> tuple[Transformer, dict]:
    """The checkpoint an added expert comes from, checked: same lineage and tokenizer, same
    model dim, layers and expert hidden size."""
    dsrc = resolve_checkpoint(a.source)
    dcfg = read_config(dsrc).resolved()
    c = model.config
    fe = c.moe.expert_ffn_dim or c.ffn_dim
    dfe = (dcfg.moe.expert_ffn_dim or dcfg.ffn_dim) if dcfg.moe.experts else dcfg.ffn_dim
    for what, got, want in (("dim", dcfg.dim, c.dim), ("n_layers", dcfg.n_layers, c.n_layers),
                            ("the expert hidden size", dfe, fe)):  # fmt: skip
        if got != want:
            raise ConfigError(f"--add {a.name}={a.source}: {what} is {got}, the model's is {want}")
    check_same_tokenizer([(src, c.vocab_size), (dsrc, dcfg.vocab_size)], "experts --add")
    donor, dmeta, _, _ = load_model(dsrc)
    base, dbase = meta.get("base_id") or meta["id"], dmeta.get("base_id") or dmeta["id"]
    if base != dbase:
        raise ConfigError(f"--add {a.name}={a.source}: another lineage (base_id {dbase}, the "
                          f"model's is {base}); add experts trained from the same seed")
    expert_weights(donor, a.expert)  # the expert name, before any data is read
    return donor, dmeta


def _router_rows(model: Transformer, meta: dict, name: str, how: str, calib_batches: int,
                 src: Path) -> torch.Tensor:
    """(layers, D) router rows of an added expert: zero, or domain `name`'s mean FFN input."""
    layers = moe_layers(model)
    D = model.config.dim
    if how == "zero":
        return torch.zeros(len(layers), D)
    from moe.data.tokenizer import checkpoint_tokenizer
    from moe.surgery.experts import domain_batches

    data, seed = data_config_of(meta)
    if name not in DOMAINS and name not in data.sources:
        raise ConfigError(f"--router-row domain_mean: expert {name!r} is not a domain with data "
                          f"(built-in domains: {', '.join(DOMAINS)}); use --router-row zero")
    data = dataclasses.replace(data, seq_len=min(data.seq_len, model.config.max_seq_len))
    tok = checkpoint_tokenizer(src, model.config.vocab_size)
    batches = domain_batches(data, seed, name, calib_batches, tokenizer=tok)
    unit_LD = domain_mean_router([model], [batches])[:, 0]  # (layers, D), unit rows
    scale_L = torch.stack([f.router.weight.detach().float().norm(dim=1).mean() for f in layers])
    return unit_LD * scale_L[:, None]
