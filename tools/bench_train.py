"""Training step time: joint domain-routed MoE vs a dense model with the same active parameters.

The dense baseline is `Transformer(ModelConfig(size=...))`. The MoE has E experts, each as wide as
the dense FFN (`expert_ffn_dim = ffn_dim`), with `router="domain"`: every token of a sequence goes
to its domain's expert (top-1, weight 1), so a token touches exactly as many parameters as in the
dense model (checked with `count_params` before timing). The batch is composed as in the joint
training stage: B/E sequences of each domain, grouped by domain.

One step = forward with targets, loss (+ aux loss, if any) backward, AdamW step, zero_grad. The
variants (dense, moe-<backend>, ...) are interleaved step by step, and the order rotates every
repeat, so load from other processes hits all of them alike. Reported: median step time over all
timed steps, tokens/s, and the ratio to dense from the same run. Target (issue): moe-torch at most
1.25x dense on CPU.

    python tools/bench_train.py                       # tiny, B=24 (8 per domain), T=128
    python tools/bench_train.py --threads 1 --json out.json
    python tools/bench_train.py --check               # exit 1 when moe-torch misses the target

Exit status is 0 whatever the timings, unless --check is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time

import torch

from moe.config import DOMAINS, MODEL_SIZES, ModelConfig, MoEConfig
from moe.model.flops import count_params, train_flops_per_token
from moe.model.transformer import Transformer

TARGET = 1.25  # moe-torch step time / dense step time, CPU


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tiny", choices=list(MODEL_SIZES), help="model preset")
    p.add_argument("--experts", type=int, default=3, help="number of domain experts E")
    p.add_argument(
        "--batch",
        type=int,
        default=24,
        help="total sequences per step B (B/E per domain; must divide by E)",
    )
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", default="torch,loop", help="comma-separated moe_mlp backends")
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)"
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    p.add_argument("--check", action="store_true", help=f"exit 1 when moe-torch / dense > {TARGET}")
    a = p.parse_args(argv)
    if a.experts < 1 or a.batch < 1 or a.batch % a.experts:
        p.error(f"--batch ({a.batch}) must be a positive multiple of --experts ({a.experts})")
    if a.steps < 1 or a.repeats < 1 or a.warmup < 0:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return a


def expert_names(n: int) -> list[str]:
    return list(DOMAINS[:n]) if n <= len(DOMAINS) else [f"expert{i}" for i in range(n)]


def configs(size: str, n_experts: int, backend: str) -> tuple[ModelConfig, ModelConfig]:
    dense = ModelConfig(size=size)
    ffn = dense.resolved().ffn_dim
    moe = ModelConfig(
        size=size,
        moe=MoEConfig(
            experts=expert_names(n_experts), expert_ffn_dim=ffn, router="domain", backend=backend
        ),
    )
    return dense, moe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    """A model, its optimizer and a fixed batch: `step()` runs one training step."""

    def __init__(self, name, cfg, x, y, domain, device, dtype, lr, seed):
        torch.manual_seed(seed)
        self.name, self.cfg = name, cfg
        self.model = Transformer(cfg).to(device=device, dtype=dtype).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.x, self.y, self.domain = x, y, domain
        self.times: list[float] = []
        self.per_repeat: list[list[float]] = []
        self.peak_bytes = 0

    def step(self) -> None:
        out = self.model(self.x, targets=self.y, domain=self.domain)
        loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def run_benchmark(a: argparse.Namespace, log=print) -> dict:
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    E, B, T = a.experts, a.batch, a.seq_len

    dense_cfg, moe_cfg = configs(a.size, E, backends[0] if backends else "torch")
    p_dense, p_moe = count_params(dense_cfg), count_params(moe_cfg)
    log(
        f"active params per token: dense {p_dense.active:,}  moe {p_moe.active:,}  "
        f"(moe total {p_moe.total:,}, {E} experts)"
    )
    assert p_dense.active == p_moe.active, "active parameter counts differ"

    g = torch.Generator().manual_seed(a.seed)
    vocab = dense_cfg.resolved().vocab_size
    tokens = torch.randint(0, vocab, (B, T + 1), generator=g)
    x, y = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)
    # grouped per domain, as the joint stage composes its batches: B/E sequences of each
    domain = torch.arange(E).repeat_interleave(B // E).to(device)

    variants = [Variant("dense", dense_cfg, x, y, None, device, dtype, a.lr, a.seed)]
    for b in backends:
        variants.append(
            Variant(f"moe-{b}", configs(a.size, E, b)[1], x, y, domain, device, dtype, a.lr, a.seed)
        )
    for v in variants:
        n = v.model.num_params()
        want = count_params(v.cfg).total
        assert n == want, f"{v.name}: model has {n} params, count_params says {want}"

    for v in variants:
        for _ in range(a.warmup):
            v.step()
    _sync(device)

    for r in range(a.repeats):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        rep = {v.name: [] for v in variants}
        for _ in range(a.steps):
            for v in order:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                _sync(device)
                t0 = time.perf_counter()
                v.step()
                _sync(device)
                dt = time.perf_counter() - t0
                rep[v.name].append(dt)
                v.times.append(dt)
                if device.type == "cuda":
                    v.peak_bytes = max(v.peak_bytes, torch.cuda.max_memory_allocated(device))
        for v in variants:
            v.per_repeat.append(rep[v.name])

    dense = variants[0]
    dense_med = statistics.median(dense.times)
    flops_tok = {
        "dense": train_flops_per_token(dense_cfg, T),
        "moe": train_flops_per_token(moe_cfg, T),
    }
    rows = []
    for v in variants:
        med = statistics.median(v.times)
        ratio = med / dense_med
        per_rep = [
            statistics.median(v.per_repeat[i]) / statistics.median(dense.per_repeat[i])
            for i in range(a.repeats)
        ]
        target = TARGET if v.name == "moe-torch" else None
        rows.append(
            {
                "variant": v.name,
                "step_ms_median": med * 1e3,
                "step_ms_min": min(v.times) * 1e3,
                "tokens_per_s": B * T / med,
                "gflops_per_s": B * T * flops_tok["dense" if v is dense else "moe"] / med / 1e9,
                "ratio_vs_dense": ratio,
                "ratio_per_repeat": per_rep,
                "target": target,
                "pass": None if target is None else ratio <= target,
                "peak_mem_gib": v.peak_bytes / 2**30 if device.type == "cuda" else None,
                "step_ms_all": [t * 1e3 for t in v.times],
            }
        )
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        },
        "args": {k: v for k, v in vars(a).items() if k not in ("json", "check")},
        "command": "python tools/bench_train.py " + " ".join(sys.argv[1:]),
        "params": {
            "dense": {"active": p_dense.active, "total": p_dense.total},
            "moe": {"active": p_moe.active, "total": p_moe.total},
        },
        "tokens_per_step": B * T,
        "results": rows,
    }


def markdown_table(res: dict) -> str:
    lines = [
        "| variant | step ms (median) | tokens/s | ratio vs dense (per repeat) | target | "
        "pass/fail |",
        "|---|---:|---:|---|---|---|",
    ]
    for r in res["results"]:
        per = ", ".join(f"{x:.2f}" for x in r["ratio_per_repeat"])
        tgt = f"<= {r['target']:.2f}x" if r["target"] is not None else "-"
        ok = "-" if r["pass"] is None else ("pass" if r["pass"] else "FAIL")
        mem = f" ({r['peak_mem_gib']:.2f} GiB peak)" if r["peak_mem_gib"] is not None else ""
        lines.append(
            f"| {r['variant']}{mem} | {r['step_ms_median']:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{r['ratio_vs_dense']:.2f}x ({per}) | {tgt} | {ok} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    res = run_benchmark(a)
    m = res["machine"]
    print(
        f"\n{m['device']}, torch {m['torch']}, {m['threads']} threads, {a.dtype}; size={a.size} "
        f"E={a.experts} B={a.batch} T={a.seq_len}; {a.steps} steps x {a.repeats} repeats "
        f"(+{a.warmup} warmup), interleaved"
    )
    print(markdown_table(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if a.check:
        for r in res["results"]:
            if r["pass"] is False:
                print(
                    f"{r['variant']}: {r['ratio_vs_dense']:.2f}x dense > {TARGET}x target",
                    file=sys.stderr,
                )
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
