"""Rolling evaluation (moe eval) vs transformers on the same protocol, weights and documents.

Both sides score the same documents under lm-evaluation-harness's rolling log-likelihood
(moe.eval.rolling): the first token of each document predicted after a prefix token, disjoint
windows of `--context` tokens, every token scored once, NLL summed per document (float64).

    ours          moe.eval.rolling.score_documents on a moe-forge `Transformer` (what `moe eval`
                  runs: the model's final hidden states, the chunked cross-entropy of
                  moe.model.loss.linear_cross_entropy)
    transformers  the loop a user writes around `LlamaForCausalLM` holding the same weights
                  (moe.io.hf_export.hf_state_dict, tied embeddings): per batch of windows
                  `model(input_ids).logits`, then `F.cross_entropy(logits.float(), targets,
                  reduction="none")` on the scored targets, summed per document

The windows are built by moe.eval.rolling.windows and batched by one rule on both sides (longest
first, at most `--batch-size` x context padded positions per forward pass, right-padded with
token 0 and no attention mask: a causal model never reads the padding), so the two sides do the
same forward passes and differ only in the model and the loss code. The weights are random
(seed 0, the model's own initialisation), the documents random tokens of the lengths
`--doc-tokens` (cycled over `--docs` documents); speed and agreement do not depend on what the
weights learned. Shapes: `smollm2` is SmolLM2-135M's (hidden 576, 30 layers, 9 heads, 3
key/value heads, SwiGLU 1536, vocabulary 49152, tied embeddings); `tiny` is for tests.

Dtypes: fp32, and bf16 (both models cast to bfloat16, as `moe eval`'s harness model and lm-eval's
HFLM do with dtype=bfloat16; both take the log-softmax in fp32).

Each side runs in its own subprocess (one per side and dtype); the two are driven in
alternation (who goes first swaps every round), so a machine that slows down affects both alike.
Tokens/s is the scored tokens over the median time of a whole pass; the ratio ours/transformers
is the median of the per-round ratios, with their range. Peak memory is measured on each
subprocess's first pass (before it no freed memory can be reused): on CUDA
torch.cuda.max_memory_allocated above what was allocated before, on CPU the peak resident set
(VmHWM, reset through /proc/self/clear_refs just before the pass) above the resident set before
it (ru_maxrss delta where the reset is not allowed). The NLLs of both sides are compared per
document: max |difference| in nats, and relative to the document's NLL. `--profile` adds each
side's top operators (self time) of one pass, to see where time goes.

    python tools/bench_eval.py                                    # smollm2 shape, fp32, cpu
    python tools/bench_eval.py --dtype fp32,bf16 --context 512 --docs 6 --json out.json
    python tools/bench_eval.py --shape tiny --repeats 1           # seconds; what the test runs
    python tools/bench_eval.py --device cuda --context 2048 --doc-tokens 3000,8000
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SHAPES = {
    "smollm2": dict(
        dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152
    ),  # fmt: skip
    # wider initialisation than the default 0.02: its predictions are far from uniform, so a
    # target scored against the wrong position would show in the NLL
    "tiny": dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, vocab_size=512, init_std=0.1
    ),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIDES = ("ours", "hf")
PREFIX = 1  # the prefix token (BOS) of every document
PAD = 0
IGNORE_INDEX = -100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="fp32", help="comma-separated: fp32, bf16")
    p.add_argument("--context", type=int, default=512, help="window length (tokens)")
    p.add_argument("--docs", type=int, default=6, help="number of documents")
    p.add_argument("--doc-tokens", default="300,1000,2500",
                   help="document lengths in tokens, cycled over the documents")  # fmt: skip
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="windows of `context` tokens per forward pass (score_documents')",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed rounds (one pass of each side per round) after the first pass",
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the documents")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also print each side's top operators (self time) of one pass",
    )
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # "<side>:<dtype>", in a subprocess
    a = p.parse_args(argv)
    a.dtypes = [d for d in a.dtype.split(",") if d]
    bad = [d for d in a.dtypes if d not in DTYPES]
    if bad or not a.dtypes:
        p.error(f"--dtype: unknown {bad[0] if bad else a.dtype!r} (choose from fp32, bf16)")
    try:
        a.lengths = [int(x) for x in a.doc_tokens.split(",") if x]
    except ValueError:
        p.error(f"--doc-tokens {a.doc_tokens!r}: give comma-separated token counts")
    if not a.lengths or min(a.lengths) < 1:
        p.error("--doc-tokens: every length must be at least 1")
    for k in ("context", "docs", "batch_size", "repeats"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    return a


# ----------------------------------------------------------------------------- models, data


def model_config(shape: str, context: int):
    from moe.config import ModelConfig

    return ModelConfig(**SHAPES[shape], max_seq_len=max(2048, context), rope_theta=100000.0,
                       norm_eps=1e-5, tie_embeddings=True)  # fmt: skip


def build(side: str, shape: str, context: int) -> torch.nn.Module:
    """The model of one side, fp32, in eval mode: both sides hold the same random weights (ours
    initialised with seed 0, copied into LlamaForCausalLM under Hugging Face names)."""
    from moe.model.transformer import Transformer

    torch.manual_seed(0)
    ours = Transformer(model_config(shape, context)).eval()
    if side == "ours":
        return ours
    return to_hf(ours)


def to_hf(ours) -> torch.nn.Module:
    """LlamaForCausalLM (SDPA attention) holding `ours`'s weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from moe.io.hf_export import hf_config, hf_state_dict

    cfg = hf_config(ours.config, {}, "float32")
    hf = LlamaForCausalLM._from_config(LlamaConfig(**cfg), attn_implementation="sdpa")
    sd = hf_state_dict(ours.config, ours.state_dict())
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    bad = [k for k in missing if "rotary" not in k and k != "lm_head.weight"]
    if bad or unexpected:
        raise RuntimeError(f"weights do not map onto LlamaForCausalLM: missing {bad}, "
                           f"unexpected {unexpected}")  # fmt: skip
    hf.tie_weights()
    if hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr():
        hf.lm_head.weight = hf.model.embed_tokens.weight
    return hf.eval()


def documents(lengths: list[int], n: int, vocab: int, seed: int) -> list[tuple[np.ndarray, int]]:
    """`n` documents of random tokens, lengths cycled from `lengths`; (tokens, bytes) pairs as
    score_documents takes them (the byte counts are nominal: 4 per token)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = lengths[i % len(lengths)]
        out.append((rng.integers(0, vocab, size=k).astype(np.int32), 4 * k))
    return out


# ----------------------------------------------------------------------------- scoring


def batches(wins: list, budget: int) -> list[list]:
    """Windows longest first, each batch at most `budget` padded positions (at least one
    window): the rule of moe.eval.rolling, written out so both sides run the same passes."""
    out: list[list] = []
    for w in sorted(wins, key=lambda w: -(w.hi - w.lo)):
        if out and (len(out[-1]) + 1) * (out[-1][0].hi - out[-1][0].lo) <= budget:
            out[-1].append(w)
        else:
            out.append([w])
    return out


def score_ours(model, docs, context: int, batch_size: int) -> np.ndarray:
    """NLL per document (nats, float64): moe.eval.rolling.score_documents, as `moe eval`."""
    from moe.eval.rolling import score_documents

    return score_documents(model, docs, PREFIX, context, batch_size=batch_size, pad_id=PAD).nats


@torch.no_grad()
def score_hf(model, docs, context: int, batch_size: int) -> np.ndarray:
    """NLL per document (nats, float64): the straightforward transformers loop."""
    from moe.eval.rolling import window_tokens, windows

    device = next(model.parameters()).device
    nats = np.zeros(len(docs), dtype=np.float64)
    wins = [w for i, (t, _) in enumerate(docs) for w in windows(len(t), context, None, i)]
    for batch in batches(wins, batch_size * context):
        L = batch[0].hi - batch[0].lo
        x = torch.full((len(batch), L), PAD, dtype=torch.long)
        y = torch.full((len(batch), L), IGNORE_INDEX, dtype=torch.long)
        for r, w in enumerate(batch):
            inp, tgt = window_tokens(docs[w.doc][0], PREFIX, w)
            x[r, : len(inp)] = torch.tensor(inp)
            y[r, len(inp) - len(tgt) : len(inp)] = torch.tensor(tgt)
        x, y = x.to(device), y.to(device)
        logits = model(x).logits  # (B, L, V)
        nll = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=IGNORE_INDEX,
                              reduction="none")  # (B, L)  # fmt: skip
        per_row = nll.double().sum(-1).cpu().numpy()
        for r, w in enumerate(batch):
            nats[w.doc] += per_row[r]
    return nats


SCORERS = {"ours": score_ours, "hf": score_hf}


# ----------------------------------------------------------------------------- measures


def _status_kib(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def peak_rss_bytes(run) -> tuple[int, str]:
    """(peak resident set during `run()` above the resident set before it, how measured)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before, hwm = _status_kib("VmRSS"), _status_kib("VmHWM")
        if before is None or hwm is None or hwm > before + 1024:
            raise OSError("VmHWM was not reset")
        run()
        return (_status_kib("VmHWM") - before) * 1024, "VmHWM"
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (after - before) * 1024, "ru_maxrss delta"


def top_ops(run, n: int = 12) -> list[dict]:
    """The `n` operators with the most self time in `run()` (profiled, so approximate)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(ProfilerActivity.CUDA)
    with profile(activities=acts) as prof:
        run()
    rows = prof.key_averages()
    cuda = torch.cuda.is_available()

    def self_us(r) -> float:
        return float(getattr(r, "self_device_time_total", 0) if cuda else r.self_cpu_time_total)

    total = sum(self_us(r) for r in rows) or 1.0
    rows = sorted(rows, key=self_us, reverse=True)[:n]
    return [{"op": r.key, "calls": r.count, "ms": self_us(r) / 1e3, "share": self_us(r) / total}
            for r in rows]  # fmt: skip


class Worker:
    """One side, one dtype in this process, scoring the documents on command."""

    def __init__(self, a: argparse.Namespace):
        self.side, dtype = a.worker.split(":")
        if a.threads:
            torch.set_num_threads(a.threads)
        self.dev = torch.device(a.device)
        model = build(self.side, a.shape, a.context)
        self.model = model.to(device=self.dev, dtype=DTYPES[dtype])
        vocab = SHAPES[a.shape]["vocab_size"]
        self.docs = documents(a.lengths, a.docs, vocab, a.seed)
        self.context, self.batch_size = a.context, a.batch_size
        self.scorer = SCORERS[self.side]
        self.nats: np.ndarray | None = None

    def run(self) -> None:
        with torch.inference_mode():
            self.nats = self.scorer(self.model, self.docs, self.context, self.batch_size)
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def first(self) -> dict:
        """The first pass: its peak memory, and the NLL per document."""
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            self.run()
            dt = time.perf_counter() - t0
            peak, how = torch.cuda.max_memory_allocated() - base, "cuda max_memory_allocated"
        else:
            t0 = time.perf_counter()
            peak, how = peak_rss_bytes(self.run)
            dt = time.perf_counter() - t0
        return {"peak_bytes": peak, "memory_measure": how, "first_s": dt,
                "nats": self.nats.tolist()}  # fmt: skip

    def time(self) -> dict:
        t0 = time.perf_counter()
        self.run()
        return {"s": time.perf_counter() - t0}

    def profile(self) -> dict:
        return {"top_ops": top_ops(self.run)}

    def serve(self) -> None:
        params = sum(p.numel() for p in self.model.parameters())
        print(json.dumps({"params": params}), flush=True)
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "quit":
                return
            print(json.dumps(getattr(self, cmd)()), flush=True)


class Remote:
    """A worker subprocess, driven over its stdin/stdout."""

    def __init__(self, a: argparse.Namespace, side: str, dtype: str, log: Path):
        self.name = f"{side}:{dtype}"
        self.log = log
        cmd = [sys.executable, __file__, "--worker", self.name, "--shape", a.shape,
               "--context", str(a.context), "--docs", str(a.docs), "--doc-tokens", a.doc_tokens,
               "--batch-size", str(a.batch_size), "--device", a.device,
               "--threads", str(a.threads), "--seed", str(a.seed)]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            env=os.environ.copy(),
        )
        self.params: int | None = None

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise SystemExit(f"{self.name} failed:\n{self.log.read_text()[-3000:]}")
        return json.loads(line)

    def ready(self) -> None:
        self.params = self._read()["params"]

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait()


def agreement(ours: list[float], hf: list[float]) -> dict:
    a, b = np.asarray(ours), np.asarray(hf)
    diff = np.abs(a - b)
    return {"max_abs_nats": float(diff.max()),
            "max_rel": float((diff / np.maximum(np.abs(b), 1e-12)).max()),
            "total_rel": float(abs(a.sum() - b.sum()) / max(abs(b.sum()), 1e-12))}  # fmt: skip


def measure(a: argparse.Namespace, dtype: str, tmp: Path) -> dict:
    """Both sides at one dtype: first pass (memory, NLL), then alternating timed rounds."""
    remotes = {s: Remote(a, s, dtype, tmp / f"{s}-{dtype}.log") for s in SIDES}
    try:
        for r in remotes.values():
            r.ready()
        first = {s: remotes[s].ask("first") for s in SIDES}
        times: dict[str, list[float]] = {s: [] for s in SIDES}
        for i in range(a.repeats):
            for s in SIDES if i % 2 == 0 else SIDES[::-1]:
                times[s].append(remotes[s].ask("time")["s"])
        prof = {s: remotes[s].ask("profile")["top_ops"] for s in SIDES} if a.profile else None
    finally:
        for r in remotes.values():
            r.close()
    docs = documents(a.lengths, a.docs, SHAPES[a.shape]["vocab_size"], a.seed)
    ntok = sum(len(t) for t, _ in docs)
    res = {}
    for s in SIDES:
        med = statistics.median(times[s])
        res[s] = dict(params=remotes[s].params, pass_s=med, times=times[s],
                      first_s=first[s]["first_s"], tokens_per_s=ntok / med,
                      peak_bytes=first[s]["peak_bytes"],
                      memory_measure=first[s]["memory_measure"],
                      nats=first[s]["nats"])  # fmt: skip
        if prof:
            res[s]["top_ops"] = prof[s]
    ratios = [h / o for h, o in zip(times["hf"], times["ours"])]  # per round: the same moment
    return dict(dtype=dtype, tokens=ntok, ours=res["ours"], hf=res["hf"],
                ratio=statistics.median(ratios), ratio_range=[min(ratios), max(ratios)],
                memory_ratio=res["ours"]["peak_bytes"] / max(res["hf"]["peak_bytes"], 1),
                nll=agreement(res["ours"]["nats"], res["hf"]["nats"]))  # fmt: skip


def table(results: list[dict]) -> str:
    rows = [
        "| dtype | ours tok/s | transformers tok/s | ours/transformers (range) | ours peak (MiB) "
        "| transformers peak (MiB) | max abs NLL diff per doc (nats) | max rel NLL diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in results:
        lo, hi = x["ratio_range"]
        o, h = x["ours"], x["hf"]
        rows.append(
            f"| {x['dtype']} | {o['tokens_per_s']:.0f} | {h['tokens_per_s']:.0f} "
            f"| {x['ratio']:.2f}x ({lo:.2f}-{hi:.2f}) | {o['peak_bytes'] / 2**20:.0f} "
            f"| {h['peak_bytes'] / 2**20:.0f} | {x['nll']['max_abs_nats']:.2e} "
            f"| {x['nll']['max_rel']:.1e} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.worker:
        Worker(a).serve()
        return 0
    docs = documents(a.lengths, a.docs, SHAPES[a.shape]["vocab_size"], a.seed)
    from moe.eval.rolling import windows

    nwin = sum(len(windows(len(t), a.context)) for t, _ in docs)
    threads = a.threads or torch.get_num_threads()
    print(f"{a.shape} shape (random weights), {a.docs} documents of {a.doc_tokens} random tokens "
          f"({sum(len(t) for t, _ in docs)} tokens, {nwin} windows), disjoint windows of "
          f"{a.context}, batch {a.batch_size}, {a.device}, torch threads {threads}, "
          f"{a.repeats} alternating rounds after a first pass each", file=sys.stderr)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(a, d, Path(tmp)) for d in a.dtypes]
    print(table(results))
    if a.profile:
        for x in results:
            for s in SIDES:
                print(f"\n{x['dtype']} {s}: top operators by self time")
                for op in x[s]["top_ops"]:
                    print(f"  {op['share']:6.1%} {op['ms']:10.1f} ms {op['calls']:6d}x  {op['op']}")
    if a.json:
        import transformers

        out = dict(date=datetime.date.today().isoformat(), machine=platform.machine(),
                   cpu_count=os.cpu_count(), torch=torch.__version__,
                   transformers=transformers.__version__,
                   args={k: v for k, v in vars(a).items() if k != "worker"},
                   windows=nwin, results=results)  # fmt: skip
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
