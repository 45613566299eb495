"""Per-domain held-out evaluation: loss (nats/token) and bits per byte, plus routing analytics.

Bits per byte = total nats over the held-out targets / total raw bytes those targets cover / ln 2.
The bytes are those of the text each target token covers (moe.data.tokenizer), so the number is
comparable across domains and across models, whatever their tokenizers. Every checkpoint is read
with its own tokenizer (the one it carries in tokenizer/, else the byte tokenizer).

The held-out data is rebuilt from the data section of the checkpoint's own recipe (same sources,
budget and seed), so the documents a model was trained on are never in its held-out set; or it is
the data given with `--data` (moe.eval.data_spec).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from moe.config import DOMAINS, ConfigError, DataConfig
from moe.data.datamodule import DomainDataModule
from moe.data.tokenizer import check_vocab
from moe.eval.data_spec import EvalData
from moe.io.checkpoint import load_model, resolve_checkpoint  # noqa: F401 (re-exported)
from moe.model.loss import bits_per_byte
from moe.model.moe_layer import domain_to_expert
from moe.model.transformer import IGNORE_INDEX, Transformer

DEAD_SHARE = 0.01  # an expert receiving under 1% of a layer's assignments on every domain is "dead"


def data_config_of(meta: dict) -> tuple[DataConfig, int]:
    """The data section (and seed) of the recipe that produced a checkpoint; defaults if none."""
    recipe = meta.get("recipe") or {}
    if "data" not in recipe and meta.get("train_recipe"):
        recipe = meta["train_recipe"]  # a merge: its recipe is the merge config
    base = OmegaConf.structured(DataConfig)
    data = recipe.get("data") if isinstance(recipe, dict) else None
    if data:
        known = {f.name for f in dataclasses.fields(DataConfig)}
        base = OmegaConf.merge(base, {k: v for k, v in data.items() if k in known})
    cfg: DataConfig = OmegaConf.to_object(base)  # type: ignore[assignment]
    return cfg, int(recipe.get("seed", 1234)) if isinstance(recipe, dict) else 1234


@torch.no_grad()
def evaluate_model(
    model: Transformer,
    data: DataConfig,
    seed: int,
    domains: list[str],
    max_batches: int = 16,
    batch_size: int = 8,
    progress: bool = True,
    datamodule: DomainDataModule | None = None,
    tokenizer=None,
    heldout_only: frozenset[str] = frozenset(),
) -> dict:
    """{domain: {loss, bpb, tokens, bytes}} and routing shares for an in-memory model.

    `tokenizer`: the model's (default: `data.tokenizer`, the byte tokenizer when unset);
    `heldout_only`: domains whose every document is held out (an evaluation set)."""
    cfg = dataclasses.replace(data, domains=list(domains), stream="mixed", weights={})
    dm = datamodule or DomainDataModule(cfg, seed=seed, tokenizer=tokenizer,
                                        heldout_only=heldout_only)  # fmt: skip
    check_vocab(dm.tokenizer, model.config.vocab_size, "evaluate")
    dm.setup("validate")
    model.eval()
    device = next(model.parameters()).device
    experts = list(model.config.moe.experts)
    hard = bool(experts) and model.config.moe.router == "domain"
    e_of_d = domain_to_expert(dm.domain_names, experts).to(device) if hard else None
    results: dict[str, dict] = {}
    routing: dict[str, list[list[float]]] = {}
    for dom in domains:
        if hard and dom not in experts:
            results[dom] = {
                "loss": None,
                "bpb": None,
                "tokens": 0,
                "bytes": 0,
                "note": "no expert for this domain",
            }
            continue
        nats, toks, nbytes = 0.0, 0, 0
        counts = None
        loader = dm.heldout_loader(dom, batch_size=batch_size, max_batches=max_batches)
        for batch in tqdm(loader, desc=f"eval {dom}", leave=False, disable=not progress):
            batch = {k: v.to(device) for k, v in batch.items()}
            hint = e_of_d[batch["domain"]] if hard else None
            out = model(batch["input_ids"], domain=hint)
            tgt = batch["targets"]
            loss = F.cross_entropy(
                out.logits.float().view(-1, out.logits.size(-1)),
                tgt.view(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            nats += float(loss.double())
            toks += int((tgt != IGNORE_INDEX).sum())
            nbytes += int(batch["target_bytes"].sum())
            if out.router_stats:
                c = torch.stack(
                    [
                        torch.bincount(
                            s["expert_ids"].reshape(-1), minlength=s["num_experts"]
                        ).cpu()
                        for s in out.router_stats
                    ]
                )  # (layers, E)
                counts = c if counts is None else counts + c
        if toks == 0:
            raise ConfigError(f"domain {dom!r} has no held-out sequences to evaluate")
        results[dom] = {
            "loss": nats / toks,
            "bpb": bits_per_byte(nats, nbytes),
            "tokens": toks,
            "bytes": nbytes,
        }
        if counts is not None:
            share = counts.double() / counts.sum(-1, keepdim=True).clamp(min=1)
            routing[dom] = share.tolist()
    report: dict = {"domains": results}
    if routing:
        n_layers = len(next(iter(routing.values())))
        dead = []
        for li in range(n_layers):
            for e, name in enumerate(experts):
                if all(routing[d][li][e] < DEAD_SHARE for d in routing):
                    dead.append({"layer": li, "expert": name})
        report["routing"] = {"experts": experts, "share": routing, "dead_experts": dead}
    return report


def evaluate_checkpoint(
    path: str | os.PathLike,
    domains: list[str] | None = None,
    max_batches: int = 16,
    batch_size: int = 8,
    progress: bool = True,
    data: EvalData | None = None,
    tokenizer: str | None = None,
) -> dict:
    """Evaluate a checkpoint on the held-out data of its own recipe, or on `data` (--data).
    `tokenizer`: a tokenizer for a checkpoint imported without one (--tokenizer)."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if max_batches < 0:
        raise ConfigError(f"--max-batches must be 0 (all) or more, got {max_batches}")
    model, meta, tok, ckpt_dir = load_model(path, tokenizer=tokenizer, require_tokenizer=True)
    cfg, seed = data_config_of(meta)
    whole: frozenset[str] = frozenset()
    if data is not None:
        cfg, doms, whole = data.resolve(cfg, domains)
    else:
        doms = list(domains) if domains else list(DOMAINS)
        for d in doms:
            if d not in DOMAINS and d not in cfg.sources:
                raise ConfigError(
                    f"unknown domain {d!r}; built-in domains are {', '.join(DOMAINS)}"
                )
    if cfg.seq_len > model.config.max_seq_len:
        cfg = dataclasses.replace(cfg, seq_len=model.config.max_seq_len)
    rep = evaluate_model(model, cfg, seed, doms, max_batches, batch_size, progress,
                         tokenizer=tok, heldout_only=whole)  # fmt: skip
    if data is not None:
        rep["data"] = data.describe()
    rep["tokenizer"] = tok.identity()
    rep.update(
        checkpoint=str(ckpt_dir),
        id=meta.get("id"),
        kind=meta.get("kind"),
        family=meta.get("family"),
        tokens_seen=meta.get("tokens_seen"),
        train_flops=meta.get("train_flops"),
    )
    return rep


def format_table(reports: list[dict]) -> str:
    """A markdown table: one row per checkpoint, loss and bits per byte per domain."""
    doms: list[str] = []
    for r in reports:
        doms += [d for d in r["domains"] if d not in doms]
    head = "| checkpoint | " + " | ".join(f"{d} loss | {d} bpb" for d in doms) + " |"
    sep = "|---|" + "---:|---:|" * len(doms)
    rows = [head, sep]
    for r in reports:
        cells = []
        for d in doms:
            v = r["domains"].get(d) or {}
            loss, bpb = v.get("loss"), v.get("bpb")
            cells += ["-" if loss is None else f"{loss:.4f}", "-" if bpb is None else f"{bpb:.4f}"]
        rows.append(f"| {r.get('checkpoint', '?')} | " + " | ".join(cells) + " |")
    for r in reports:
        rt = r.get("routing")
        if not rt:
            continue
        rows.append("")
        rows.append(f"routing of {r.get('checkpoint')} (share of assignments, layer-averaged):")
        rows.append("| domain | " + " | ".join(rt["experts"]) + " |")
        rows.append("|---|" + "---:|" * len(rt["experts"]))
        for d, share in rt["share"].items():
            avg = [sum(layer[e] for layer in share) / len(share) for e in range(len(rt["experts"]))]
            rows.append(f"| {d} | " + " | ".join(f"{a:.2f}" for a in avg) + " |")
        if rt["dead_experts"]:
            rows.append(
                "dead experts: "
                + ", ".join(f"layer {x['layer']} {x['expert']}" for x in rt["dead_experts"])
            )
    return "\n".join(rows)
