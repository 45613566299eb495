"""The retokenize measurement (`surgery.kind: retokenize`, see moe/experiments/surgery/study.py).

Per seed a byte-level model (the source) trains `steps`. A byte-level BPE of `vocab_size`
tokens is trained once on the corpora's train split (moe/surgery/retokenize.py). Each arm then
trains `retok_steps` with the BPE tokenizer, held-out bpb every `eval_every` steps:
    mean          the source, embeddings re-made as the mean of its byte rows, everything trained
    mean+frozen   the same, only the embeddings and the head trained (body frozen)
    random        the source with fresh random embeddings, everything trained
    random+frozen the same, body frozen
    scratch       a new model of the source's shape with the BPE vocabulary, from random init
Bits per byte divide by the UTF-8 bytes each target covers, so byte and BPE models compare. The
BPE models' held-out batches hold the same number of sequences as the byte model's, so they
cover a longer prefix of the same held-out documents (a BPE token spans several bytes).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from moe.config import ConfigError, Recipe

ARMS = ("mean", "mean+frozen", "random", "random+frozen", "scratch")


def check(r: Recipe) -> None:
    s = r.surgery
    bad = [a for a in s.arms if a not in ARMS]
    if not s.arms or bad:
        raise ConfigError(f"surgery retokenize: arms must list some of {', '.join(ARMS)}"
                          + (f"; {bad[0]!r} is not one" if bad else ""))  # fmt: skip
    if s.vocab_size < 258:
        raise ConfigError("surgery retokenize: vocab_size must be >= 258 (bytes + specials)")
    if s.retok_steps < 1:
        raise ConfigError("surgery retokenize: retok_steps must be >= 1")
    if r.model.resolved().vocab_size != 259 or r.data.tokenizer not in (None, "byte"):
        raise ConfigError("surgery retokenize: the source is a byte-level model (vocab_size 259, "
                          "data.tokenizer byte)")  # fmt: skip


def plan(r: Recipe, n: int) -> str:
    s = r.surgery
    return (f"surgery retokenize {r.name}: per seed ({n}) a byte-level model {s.steps} steps; a "
            f"BPE of {s.vocab_size} tokens; arms {', '.join(s.arms)}, {s.retok_steps} steps "
            "each")  # fmt: skip


def train_arm(model, r: Recipe, steps: int, warmup: int, dm, heldout, eval_every: int,
              trainable: str) -> dict:  # fmt: skip
    """moe.experiments.init.study.train_loop with a trainable set (embeddings only when frozen)."""
    from moe.experiments.init.study import train_loop

    optim = dataclasses.replace(r.optim, warmup_steps=warmup, total_steps=None)
    return train_loop(model, r, optim, steps, dm, heldout, eval_every, [], None,
                      trainable=trainable)  # fmt: skip


def run_retokenize(ctx, seeds: list[int]) -> dict:
    from moe.data.datamodule import DomainDataModule
    from moe.data.tokenizer import ByteTokenizer, load_tokenizer
    from moe.eval.heldout import HeldOut
    from moe.model.transformer import Transformer
    from moe.surgery.retokenize import check_covers_bytes, retokenize_state, train_bpe

    s, r = ctx.s, ctx.r
    tok_dir = ctx.out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        train_bpe(r.data, s.vocab_size, tok_dir)
    tok = load_tokenizer(tok_dir)
    check_covers_bytes(tok, str(tok_dir))
    bdm = DomainDataModule(r.data, seed=r.seed, tokenizer=tok)
    bdm.setup()
    held = HeldOut(bdm, ctx.domains, s.eval_batches, r.eval.batch_size)
    cfg = r.model.resolved()
    big = dataclasses.replace(cfg, vocab_size=tok.vocab_size)
    runs: dict = {a: {} for a in ARMS if a in s.arms}
    sources = {}
    for seed in seeds:
        src = ctx.trained(f"source-seed{seed}", cfg, s.steps, seed)
        sources[str(seed)] = ctx.cached(f"source-seed{seed}", lambda m=src: {
            "bpb": ctx.heldout.bpb(m)})  # fmt: skip
        for arm in s.arms:

            def go(arm=arm, seed=seed, src=src) -> dict:
                init, _, frozen = arm.partition("+")
                if init == "scratch":
                    torch.manual_seed(seed)
                    model = Transformer(big)
                else:
                    c2, sd2 = retokenize_state(cfg, src.state_dict(), ByteTokenizer(), tok, init,
                                               seed)  # fmt: skip
                    model = Transformer.from_state(c2, sd2)
                dm = DomainDataModule(r.data, seed=seed, tokenizer=tok)
                dm._tokens = bdm._tokens  # the same corpora; the seed's data order
                torch.manual_seed(seed)
                rec = train_arm(model, r, s.retok_steps, s.warmup_steps, dm, held, s.eval_every,
                                "embeddings" if frozen else "all")  # fmt: skip
                if rec["diverged_at"] is not None:
                    raise ConfigError(f"surgery retokenize: arm {arm} diverged at step "
                                      f"{rec['diverged_at']} (seed {seed})")  # fmt: skip
                return rec

            runs[arm][str(seed)] = ctx.cached(f"{arm}-seed{seed}", go)
    return {"vocab_size": tok.vocab_size, "arms": list(s.arms), "sources": sources,
            "runs": runs, "bytes_per_token": _bytes_per_token(bdm, ctx.domains)}  # fmt: skip


def _bytes_per_token(dm, domains) -> dict:
    out = {}
    for d in domains:
        t = dm.tokens(d)
        nb = t.train_nbytes
        out[d] = float(nb.sum()) / max(len(t.train), 1) if nb is not None else None
    return out


def retokenize_section(res: dict, out) -> list[str]:
    from moe.experiments.init.report import steps_to
    from moe.experiments.surgery.report import _plt, ci, fmt, pci

    seeds = [str(x) for x in res["seeds"]]
    doms = [*res["domains"], "mean"]
    src = {d: ci([res["sources"][x]["bpb"][d] for x in seeds]) for d in doms}
    L = ["## Retokenize: a byte-level model moved to a BPE tokenizer", ""]
    bpt = ", ".join(f"{d} {v:.2f}" for d, v in res["bytes_per_token"].items() if v)
    L += ["Source: the byte-level model, held-out bpb " + ", ".join(f"{d} {fmt(src[d])}"
          for d in doms) + f". New tokenizer: byte-level BPE of {res['vocab_size']} tokens "
          f"trained on the train split (bytes per token: {bpt}). Each arm trains "
          f"{res['runs'][res['arms'][0]][seeds[0]]['eval_steps'][-1]} steps with it. Cells: "
          "held-out bpb (mean over seeds ± 95% interval); *vs scratch*: paired difference at "
          "the same step.", ""]  # fmt: skip
    steps = res["runs"][res["arms"][0]][seeds[0]]["eval_steps"]
    picks = sorted({0, steps[min(len(steps) - 1, max(1, len(steps) // 10))],
                    steps[len(steps) // 2], steps[-1]})  # fmt: skip
    idx = [steps.index(p) for p in picks]
    L += ["| arm | " + " | ".join(f"step {p}" for p in picks) + " | final vs scratch | steps "
          "to the source's bpb |", "|---" * (3 + len(picks)) + "|"]  # fmt: skip
    summary = {}
    for arm in res["arms"]:
        rr = res["runs"][arm]
        cells = [ci([rr[x]["bpb"][k]["mean"] for x in seeds]) for k in idx]
        vs = None
        if "scratch" in res["runs"] and arm != "scratch":
            vs = pci(
                [rr[x]["bpb"][-1]["mean"] for x in seeds],
                [res["runs"]["scratch"][x]["bpb"][-1]["mean"] for x in seeds],
            )
        # recovery: the first step at which the arm is as good as its own seed's source
        reach = [steps_to(rr[x]["eval_steps"], [b["mean"] for b in rr[x]["bpb"]],
                          res["sources"][x]["bpb"]["mean"]) for x in seeds]  # fmt: skip
        rec = ci(reach)
        got = sum(v is not None for v in reach)
        summary[arm] = {"at": dict(zip(map(str, picks), cells)), "final_vs_scratch": vs,
                        "steps_to_source": rec, "seeds_reaching_source": got}  # fmt: skip
        L.append(f"| {arm} | " + " | ".join(fmt(c) for c in cells) + " | "
                 + (f"{fmt(vs)} ({vs['verdict']})" if vs else "—")
                 + f" | {fmt(rec, 0)} ({got}/{len(seeds)} seeds) |")  # fmt: skip
    res["summary"] = {"source": src, "arms": summary}
    L += ["", "![bpb against steps](plots/retokenize.png)", ""]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, arm in enumerate(res["arms"]):
        rr = res["runs"][arm]
        ys = [ci([rr[x]["bpb"][k]["mean"] for x in seeds]) for k in range(len(steps))]
        m = [y["mean"] for y in ys]
        h = [0.0 if y["half"] is None or math.isnan(y["half"]) else y["half"] for y in ys]
        ax.plot(steps, m, color=f"C{i}", label=arm, lw=1.4)
        ax.fill_between(steps, [a - b for a, b in zip(m, h)], [a + b for a, b in zip(m, h)],
                        color=f"C{i}", alpha=0.2, lw=0)  # fmt: skip
    ax.axhline(src["mean"]["mean"], color="k", lw=0.8, ls="--", label="source (bytes)")
    ax.set_xlabel("training steps with the new tokenizer")
    ax.set_ylabel("held-out bits per byte (mean of domains)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "plots" / "retokenize.png", dpi=110)
    plt.close(fig)
    return L
