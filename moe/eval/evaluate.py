"""Per-domain held-out evaluation: loss (nats/token) and bits per byte, plus routing analytics.

The protocol (stated in every report, `protocol`, and above `moe eval`'s table) is, by default,
lm-evaluation-harness's rolling log-likelihood (moe.eval.rolling): every held-out document whole,
tokenized alone, its first token predicted after the tokenizer's BOS (else EOS), in disjoint
windows of the model's own context (`max_seq_len`), each token scored once. `context` lowers the
context, `stride` slides windows by that many tokens instead (the Hugging Face perplexity guide),
`max_docs` scores only the first N documents of each domain (a sample, said so in the report).
A document is a held-out unit: a whole genome region for DNA, a piece of a novel or a source file
for the built-in corpora, a whole file, table row or FASTA record for an evaluation set (`--data
DOMAIN=FILE`). Bits per byte = total NLL / ln 2 / total UTF-8 bytes of the documents scored; the
report keeps each document's NLL, tokens and bytes (`per_document`) for bootstraps over documents.

`protocol="chunks"` is the older, cheaper measure the study and the ensemble still use: the
held-out documents packed into one `BOS doc EOS ...` stream, cut into `data.seq_len` chunks
(a token sees only the tokens before it in its chunk, 64-128 by default), `max_batches` batches
of them; its denominator is the bytes each target token covers (moe.data.tokenizer).

Every checkpoint is read with its own tokenizer (the one it carries in tokenizer/, else the byte
tokenizer). The held-out data is rebuilt from the data section of the checkpoint's own recipe
(same sources, budget and seed), so the documents a model was trained on are never in its
held-out set; or it is the data given with `--data` (moe.eval.data_spec).
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
from moe.eval.rolling import check_protocol, prefix_token, score_documents
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


def _chunk_domain(model, dm, dom: str, max_batches: int, batch_size: int, hint_of,
                  progress: bool) -> tuple[dict, torch.Tensor | None]:  # fmt: skip
    """The packed-chunk protocol on one domain: (its record, routing counts or None)."""
    device = next(model.parameters()).device
    nats, toks, nbytes = 0.0, 0, 0
    counts = None
    loader = dm.heldout_loader(dom, batch_size=batch_size, max_batches=max_batches)
    for batch in tqdm(loader, desc=f"eval {dom}", leave=False, disable=not progress):
        batch = {k: v.to(device) for k, v in batch.items()}
        hint = None if hint_of is None else hint_of[batch["domain"]]
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
            c = torch.stack([
                torch.bincount(s["expert_ids"].reshape(-1), minlength=s["num_experts"]).cpu()
                for s in out.router_stats
            ])  # (layers, E)  # fmt: skip
            counts = c if counts is None else counts + c
    if toks == 0:
        raise ConfigError(f"domain {dom!r} has no held-out sequences to evaluate")
    rec = {"loss": nats / toks, "bpb": bits_per_byte(nats, nbytes), "tokens": toks,
           "bytes": nbytes}  # fmt: skip
    return rec, counts


def _rolling_domain(model, dm, dom: str, context: int, stride: int | None, max_docs: int | None,
                    batch_size: int, hint: int | None, progress: bool
                    ) -> tuple[dict, torch.Tensor | None]:  # fmt: skip
    """The rolling protocol on one domain: (its record with per-document NLL, routing counts)."""
    docs = dm.heldout_documents(dom)
    total = len(docs)
    docs = docs[:max_docs] if max_docs else docs
    sc = score_documents(model, docs, prefix_token(dm.tokenizer)[0], context, stride,
                         batch_size, dm.tokenizer.pad_id, hint, progress,
                         f"eval {dom}")  # fmt: skip
    nats, toks, nbytes = float(sc.nats.sum()), int(sc.tokens.sum()), int(sc.bytes.sum())
    if toks == 0:
        raise ConfigError(f"domain {dom!r} has no held-out tokens to evaluate")
    rec = {"loss": nats / toks, "bpb": bits_per_byte(nats, nbytes), "tokens": toks,
           "bytes": nbytes, "documents": len(docs), "documents_total": total,
           "per_document": {"nats": sc.nats.tolist(), "tokens": sc.tokens.tolist(),
                            "bytes": sc.bytes.tolist()}}  # fmt: skip
    return rec, sc.routing


@torch.no_grad()
def evaluate_model(
    model: Transformer,
    data: DataConfig,
    seed: int,
    domains: list[str],
    max_batches: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    datamodule: DomainDataModule | None = None,
    tokenizer=None,
    heldout_only: frozenset[str] = frozenset(),
    *,
    protocol: str = "rolling",
    context: int | None = None,
    stride: int | None = None,
    max_docs: int | None = None,
) -> dict:
    """{"protocol": ..., "domains": {domain: {loss, bpb, tokens, bytes, ...}}} and routing shares
    for an in-memory model (the module docstring).

    `protocol`: "rolling" (default: every held-out document whole; `context` default the model's
    max_seq_len, `stride` None = disjoint windows, `max_docs` the first N documents of each
    domain) or "chunks" (the packed stream in `data.seq_len` chunks, `max_batches` batches of
    `batch_size`, default 16, 0 = all). `tokenizer`: the model's (default `data.tokenizer`, the
    byte tokenizer when unset); `heldout_only`: domains whose every document is held out."""
    if protocol == "rolling":
        if max_batches is not None:
            raise ConfigError("max_batches belongs to protocol='chunks'; the rolling protocol "
                              "samples with max_docs")
        ctx = check_protocol(context, stride, max_docs, model.config.max_seq_len, cli=False)
    elif protocol == "chunks":
        if (context, stride, max_docs) != (None, None, None):
            raise ConfigError("context, stride and max_docs belong to protocol='rolling'")
        max_batches = 16 if max_batches is None else max_batches
    else:
        raise ConfigError(f"unknown evaluation protocol {protocol!r} (rolling, chunks)")
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
            results[dom] = {"loss": None, "bpb": None, "tokens": 0, "bytes": 0,
                            "note": "no expert for this domain"}  # fmt: skip
            continue
        if protocol == "rolling":
            hint = int(e_of_d[dm.domain_id(dom)]) if hard else None
            results[dom], counts = _rolling_domain(model, dm, dom, ctx, stride, max_docs,
                                                   batch_size, hint, progress)  # fmt: skip
        else:
            results[dom], counts = _chunk_domain(model, dm, dom, max_batches, batch_size, e_of_d,
                                                 progress)  # fmt: skip
        if counts is not None:
            share = counts.double() / counts.sum(-1, keepdim=True).clamp(min=1)
            routing[dom] = share.tolist()
    if protocol == "rolling":
        scored = [r for r in results.values() if "documents" in r]
        desc = {"kind": "rolling", "context": ctx, "stride": stride,
                "prefix": prefix_token(dm.tokenizer)[1],
                "documents": sum(r["documents"] for r in scored),
                "documents_total": sum(r["documents_total"] for r in scored),
                "sampled": any(r["documents"] < r["documents_total"] for r in scored),
                "max_docs": max_docs}  # fmt: skip
    else:
        desc = {"kind": "chunks", "seq_len": cfg.seq_len, "batch_size": batch_size,
                "max_batches": max_batches, "sampled": max_batches != 0}  # fmt: skip
    report: dict = {"protocol": desc, "domains": results}
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
    max_batches: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    data: EvalData | None = None,
    tokenizer: str | None = None,
    *,
    protocol: str = "rolling",
    context: int | None = None,
    stride: int | None = None,
    max_docs: int | None = None,
    experts: list[str] | None = None,
    expert_top_k: int | None = None,
) -> dict:
    """Evaluate a checkpoint on the held-out data of its own recipe, or on `data` (--data), under
    `protocol` (see evaluate_model). `tokenizer`: a tokenizer for a checkpoint imported without
    one (--tokenizer). `experts` / `expert_top_k`: an MoE with only these experts, or another
    top-k, in memory (moe.model.expert_subset; the report's `experts_subset` says so)."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if max_batches is not None and max_batches < 0:
        raise ConfigError(f"--max-batches must be 0 (all) or more, got {max_batches}")
    model, meta, tok, ckpt_dir = load_model(path, tokenizer=tokenizer, require_tokenizer=True)
    subset = None
    if experts is not None or expert_top_k is not None:
        from moe.model.expert_subset import plan_experts, restrict_experts

        full = list(model.config.moe.experts)
        kept, k, notes = plan_experts(model.config, keep=experts, top_k=expert_top_k,
                                      where=str(ckpt_dir), keep_flag="--experts",
                                      k_flag="--expert-top-k")  # fmt: skip
        restrict_experts(model, kept, k)
        subset = {"experts": kept, "top_k": k, "of_experts": full, "notes": notes}
    if protocol == "rolling":  # before any corpus is built
        check_protocol(context, stride, max_docs, model.config.max_seq_len)
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
                         tokenizer=tok, heldout_only=whole, protocol=protocol, context=context,
                         stride=stride, max_docs=max_docs)  # fmt: skip
    trained = _trained_seq_len(meta)
    p = rep["protocol"]
    if p["kind"] == "rolling" and trained is not None and p["context"] > trained:
        p["trained_seq_len"] = trained  # said beside the context: positions it never trained at
    if data is not None:
        rep["data"] = data.describe()
    rep["tokenizer"] = tok.identity()
    if subset is not None:
        rep["experts_subset"] = subset
    rep.update(
        checkpoint=str(ckpt_dir),
        id=meta.get("id"),
        kind=meta.get("kind"),
        family=meta.get("family"),
        tokens_seen=meta.get("tokens_seen"),
        train_flops=meta.get("train_flops"),
    )
    return rep


def _trained_seq_len(meta: dict) -> int | None:
    """The sequence length of the checkpoint's last training run (its recipe's data.seq_len),
    None when it was not trained here (an import, or a merge of imports)."""
    recipe = meta.get("recipe")
    data = recipe.get("data") if isinstance(recipe, dict) else None
    if not isinstance(data, dict) or data.get("seq_len") is None:
        return None
    return int(data["seq_len"])


def describe_protocol(p: dict | None) -> str:
    """One line saying how a report scored its documents."""
    if not p:
        return "protocol: not recorded"
    if p.get("kind") == "chunks":
        n = p.get("max_batches")
        how = "every held-out sequence" if not n else (
            f"{n} batches of {p.get('batch_size')} sequences per domain (a sample)")
        return (f"protocol: packed chunks of {p.get('seq_len')} tokens (documents joined into "
                f"one stream), {how}")
    stride = p.get("stride")
    win = "disjoint windows" if stride is None else f"sliding windows, stride {stride}"
    docs = f"{p.get('documents')} of {p.get('documents_total')} documents"
    if p.get("sampled"):
        docs += f" (a sample: the first {p.get('max_docs')} of each domain)"
    ctx = f"context {p.get('context')} tokens"
    if p.get("trained_seq_len"):
        ctx += (f" (longer than the {p['trained_seq_len']}-token sequences of its last training; "
                f"--context {p['trained_seq_len']} scores within them)")
    return (f"protocol: rolling log-likelihood (lm-eval's), each document whole, {ctx}, {win}, "
            f"first token after {str(p.get('prefix')).upper()}; {docs}")


def format_table(reports: list[dict]) -> str:
    """A markdown table: one row per checkpoint, loss and bits per byte per domain."""
    doms: list[str] = []
    for r in reports:
        doms += [d for d in r["domains"] if d not in doms]
    head = "| checkpoint | " + " | ".join(f"{d} loss | {d} bpb" for d in doms) + " |"
    sep = "|---|" + "---:|---:|" * len(doms)
    lines = {describe_protocol(r.get("protocol")) for r in reports}
    if len(lines) == 1:
        top = lines.pop()
    else:
        top = "; ".join(f"{r.get('checkpoint', '?')}: "
                        + describe_protocol(r.get("protocol")).removeprefix("protocol: ")
                        for r in reports)  # fmt: skip
    rows = [top, "", head, sep]
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
