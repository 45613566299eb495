"""Checkpoint-level expert operations behind `moe split` and `moe assemble`.

These read and write checkpoint directories (with lineage) around the tensor-level functions of
`moe.model.split`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path

from moe.config import ASSEMBLE_SHARED, DOMAINS, ROUTER_INITS, ConfigError, DataConfig
from moe.data.datamodule import DomainDataModule
from moe.data.tokenizer import carried_tokenizer, check_same_tokenizer, checkpoint_tokenizer
from moe.eval.evaluate import data_config_of, resolve_checkpoint
from moe.io.checkpoint import load_model, make_meta, read_config, save_checkpoint
from moe.io.output import claim
from moe.model.split import assemble, domain_mean_router, neuron_importance, split_model
from moe.model.transformer import Transformer


def _load(path: str | os.PathLike) -> tuple[Transformer, dict]:
    loaded = load_model(path)
    return loaded.model, loaded.meta


def _tokenizer(path: str | os.PathLike, model: Transformer):
    """The checkpoint's tokenizer, loaded (to read its domains' text)."""
    return checkpoint_tokenizer(resolve_checkpoint(path), model.config.vocab_size)


def _carried(path: str | os.PathLike, model: Transformer):
    """The checkpoint's tokenizer as the output checkpoint carries it on (None if it has none)."""
    return carried_tokenizer(resolve_checkpoint(path), model.config.vocab_size)


def domain_batches(
    data: DataConfig, seed: int, domain: str, n_batches: int, batch_size: int = 8,
    tokenizer=None,
) -> list[dict]:
    """`n_batches` training batches of one domain (never held-out data: splits use these)."""
    cfg = dataclasses.replace(
        data, domains=[domain], stream="separate", weights={}, batch_size=batch_size
    )
    dm = DomainDataModule(cfg, seed=seed, tokenizer=tokenizer)
    dm.setup("fit")
    # the training stream repeats the split forever: more batches than one pass holds would
    # only re-read the same sequences (and a huge count would never end)
    available = -(-len(dm.sequences(domain, "train")) // batch_size)
    if n_batches > available:
        raise ConfigError(
            f"{n_batches} calibration batches of {batch_size} is more than {domain}'s training "
            f"split holds ({available} batches); ask for at most {available}"
        )
    return list(itertools.islice(iter(dm.train_dataloader()), n_batches))


def split_checkpoint(
    path: str | os.PathLike,
    out: str | os.PathLike,
    experts: list[str],
    method: str = "copy",
    router: str = "learned",
    top_k: int | None = None,
    shared_dim: int = 0,
    seed: int = 0,
    calib_batches: int = 8,
    overwrite: bool = False,
) -> Path:
    """Split a dense checkpoint into an MoE checkpoint whose experts are named `experts`."""
    if Path(out).exists() and not overwrite:
        raise ConfigError(f"{out} already exists (pass --overwrite to replace it)")
    with claim(out, [path]):  # moe/io/output.py: before anything is read or written
        if method == "copy":  # every expert a copy of the FFN: E times its weights, beside it
            from moe.model.flops import check_memory, memory_needed

            cfg = read_config(resolve_checkpoint(path))
            split_cfg = dataclasses.replace(
                cfg, moe=dataclasses.replace(cfg.moe, experts=list(experts)))
            check_memory(split_cfg, f"split into {len(experts)} experts",
                         extra=memory_needed(cfg))
        dense, meta = _load(path)
        importance = None
        if method == "activation":
            # neuron scores come from training documents only, so held-out evaluation stays clean
            data, dseed = data_config_of(meta)
            for e in experts:
                if e not in DOMAINS and e not in data.sources:
                    raise ConfigError(
                        f"activation split: expert {e!r} is not a domain with data "
                        f"(built-in domains: {', '.join(DOMAINS)})"
                    )
            seq = min(data.seq_len, dense.config.max_seq_len)
            data = dataclasses.replace(data, seq_len=seq)
            tok = _tokenizer(path, dense)
            batches = {e: domain_batches(data, dseed, e, calib_batches, tokenizer=tok)
                       for e in experts}  # fmt: skip
            importance = neuron_importance(dense, batches)
        moe, info = split_model(
            dense,
            experts,
            method,
            router=router,
            top_k=top_k,
            shared_dim=shared_dim,
            seed=seed,
            importance=importance,
        )
        new_meta = make_meta(
            parents=[meta["id"]],
            base_id=meta.get("base_id") or meta["id"],
            kind="moe",
            tokens_seen=meta.get("tokens_seen", 0),
            train_flops=meta.get("train_flops", 0.0),
            recipe=meta.get("recipe"),
            split=info,
        )
        return save_checkpoint(out, moe.state_dict(), moe.config, new_meta, overwrite=overwrite,
                               tokenizer=_carried(path, dense))


def assemble_checkpoints(
    paths: list[str | os.PathLike],
    out: str | os.PathLike,
    experts: list[str] | None = None,
    shared: str = "average",
    base: str | os.PathLike | None = None,
    router: str = "learned",
    top_k: int | None = None,
    router_init: str = "random",
    seed: int = 0,
    calib_batches: int = 4,
    overwrite: bool = False,
    generalist: str | os.PathLike | None = None,
) -> Path:
    """Branch-Train-Mix: dense branch checkpoints become one MoE (experts named by domain).

    `generalist` adds the seed the branches came from as one more expert, named "generalist"
    (BTX adds the seed model's FFN alongside the domain experts).
    """
    if Path(out).exists() and not overwrite:
        raise ConfigError(f"{out} already exists (pass --overwrite to replace it)")
    if shared not in ASSEMBLE_SHARED:
        raise ConfigError(f"--shared must be {' or '.join(ASSEMBLE_SHARED)}, got {shared!r}")
    if shared == "base" and base is None:
        raise ConfigError("--shared base needs --base CKPT")
    if router_init not in ROUTER_INITS:
        raise ConfigError(f"--router-init must be {' or '.join(ROUTER_INITS)}, got {router_init!r}")
    with claim(out, [*paths, base, generalist]):  # moe/io/output.py
        loaded = [_load(p) for p in paths]
        others = [p for p in (base, generalist) if p is not None]
        check_same_tokenizer(
            [(resolve_checkpoint(p), m.config.vocab_size) for p, (m, _) in zip(paths, loaded)]
            + [(resolve_checkpoint(p), read_config(resolve_checkpoint(p)).vocab_size)
               for p in others],
            "assemble",
        )  # fmt: skip
        branches = [m for m, _ in loaded]
        metas = [meta for _, meta in loaded]
        names = list(experts) if experts else [m.get("domain") or m.get("family") for m in metas]
        general = None
        if generalist is not None:
            general = _load(generalist)
            gid = general[1]["id"]
            if {m.get("base_id") for m in metas} != {general[1].get("base_id") or gid}:
                raise ConfigError(
                    f"generalist {generalist}: the branches were not trained from it "
                    "(base_id differs)"
                )
            if "generalist" in names:
                raise ConfigError("an expert is already named 'generalist'")
        for p, n in zip(paths, names):
            if not n:
                raise ConfigError(f"{p}: branch has no domain in its meta; pass --experts")
        if len(set(names)) != len(names):
            raise ConfigError(f"two branches claim the same expert: {names}")
        bases = {m.get("base_id") for m in metas}
        if len(bases) > 1:
            raise ConfigError(
                "branches come from different base models (base_id "
                + ", ".join(sorted(str(b) for b in bases))
                + "); assemble only branches of one seed"
            )
        fs = {int(m.get("shared_ffn_dim", 0)) for m in metas}
        if len(fs) > 1:
            raise ConfigError(f"branches disagree on the shared expert size: {sorted(fs)}")
        base_model = _load(base)[0] if shared == "base" and base is not None else None
        init = None
        if router_init == "domain_mean" and router == "learned":
            data, dseed = data_config_of(metas[0])
            tok = _tokenizer(paths[0], branches[0])
            batches = [domain_batches(data, dseed, n, calib_batches, tokenizer=tok) for n in names]
            if general is not None:
                # the generalist's row: its mean input over every expert's domain
                mixed = [b for per in batches for b in per]
                init = domain_mean_router(branches + [general[0]], batches + [mixed])
            else:
                init = domain_mean_router(branches, batches)
        if general is not None:
            branches = branches + [general[0]]
            names = names + ["generalist"]
        moe = assemble(
            branches,
            names,
            shared_ffn_dim=fs.pop(),
            base=base_model,
            router=router,
            top_k=top_k,
            router_init=init,
            seed=seed,
        )
        meta = make_meta(
            parents=[m["id"] for m in metas],
            base_id=bases.pop(),
            kind="moe",
            # a BTX model has consumed the shared ancestry once plus every branch's own training
            tokens_seen=_lineage_total(metas, "tokens_seen", "tokens"),
            train_flops=_lineage_total(metas, "train_flops", "flops"),
            recipe=metas[0].get("recipe"),
            assembled=dict(experts=names, shared=shared, router=router, router_init=router_init),
        )
        return save_checkpoint(out, moe.state_dict(), moe.config, meta, overwrite=overwrite,
                               tokenizer=_carried(paths[0], loaded[0][0]))



def _lineage_total(metas: list[dict], total_key: str, stage_key: str) -> float:
    """Shared ancestry counted once + each branch's own stage (from meta.stage when recorded)."""
    own = [float((m.get("stage") or {}).get(stage_key, 0.0)) for m in metas]
    ancestry = max(float(m.get(total_key, 0.0)) - o for m, o in zip(metas, own))
    total = ancestry + sum(own)
    return int(total) if total_key == "tokens_seen" else total
