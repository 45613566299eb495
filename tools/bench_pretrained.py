"""One training step (forward + backward) of our model vs transformers', at SmolLM2-135M's shape.

Pairs, each with random weights of the same shapes:
    dense  moe-forge `Transformer`           vs `LlamaForCausalLM`
    moe    moe-forge MoE (8 experts, top-2)  vs `MixtralForCausalLM` (8 experts, top-2)
SmolLM2-135M: hidden 576, 30 layers, 9 heads, 3 key/value heads, SwiGLU 1536, vocabulary 49152,
tied embeddings. Every MoE expert is as wide as the dense FFN (what `moe split --method copy`
makes of SmolLM2), and both MoEs add their router's load-balancing loss.

A step is what training does per batch: the loss of every position (ours: the chunked
cross-entropy of moe.model.loss, as training uses it; transformers: `labels=`, its own loss) and
its backward, gradients freed afterwards. Each model lives in its own subprocess, and the two
are stepped in alternation (who goes first swaps every round), so a machine that slows down or
speeds up affects both alike; the speed-up is the median of the per-round ratios, with their
range. Peak memory is the most the step holds above what was held before it: torch's allocator
on CUDA (max_memory_allocated), and on CPU every allocation and free the profiler records,
replayed in order (the same quantity; the resident set would hide reuse of freed pages).
`--profile` adds our share of step time in matrix products and the speed-up ceiling it implies:
transformers' step time over the time of our matrix products alone.

    python tools/bench_pretrained.py                      # batch 1, seq 256, 5 rounds
    python tools/bench_pretrained.py --batch 2 --steps 9 --profile --json out.json
    python tools/bench_pretrained.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPE = dict(hidden=576, layers=30, heads=9, kv_heads=3, ffn=1536, vocab=49152)
EXPERTS, TOP_K = 8, 2
IMPLS = ("ours", "hf")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument(
        "--steps", type=int, default=5, help="timed rounds (one step of each model per round)"
    )
    p.add_argument("--layers", type=int, default=SHAPE["layers"])
    p.add_argument("--pairs", default="dense,moe", help="dense, moe or both")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16: both under torch.autocast (weights fp32), as bf16-mixed trains",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile one step of each: our share of time in matrix products, and the "
        "speed-up we would have if nothing else took time",
    )
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # "<pair>:<impl>", run in a subprocess
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- models


def build(pair: str, impl: str, layers: int) -> torch.nn.Module:
    s = SHAPE
    if impl == "ours":
        from moe.config import ModelConfig, MoEConfig
        from moe.model.transformer import Transformer

        moe = (
            MoEConfig(
                experts=[f"e{i}" for i in range(EXPERTS)],
                top_k=TOP_K,
                expert_ffn_dim=s["ffn"],
                z_loss_coef=0.0,  # Mixtral has no z-loss; the load-balancing loss stays
            )
            if pair == "moe"
            else MoEConfig()
        )
        return Transformer(
            ModelConfig(
                dim=s["hidden"],
                n_layers=layers,
                n_heads=s["heads"],
                n_kv_heads=s["kv_heads"],
                ffn_dim=s["ffn"],
                vocab_size=s["vocab"],
                max_seq_len=2048,
                rope_theta=100000.0,
                tie_embeddings=True,
                moe=moe,
            )
        )
    common = dict(
        hidden_size=s["hidden"],
        num_hidden_layers=layers,
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        intermediate_size=s["ffn"],
        vocab_size=s["vocab"],
        max_position_embeddings=2048,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )
    if pair == "moe":
        from transformers import MixtralConfig, MixtralForCausalLM

        cfg = MixtralConfig(
            num_local_experts=EXPERTS,
            num_experts_per_tok=TOP_K,
            output_router_logits=True,
            **common,
        )
        return MixtralForCausalLM._from_config(cfg, attn_implementation="sdpa")
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM._from_config(LlamaConfig(**common), attn_implementation="sdpa")


def step_fn(model: torch.nn.Module, impl: str, ids: torch.Tensor):
    if impl == "ours":
        from moe.model.loss import linear_cross_entropy
        from moe.model.transformer import IGNORE_INDEX

        tgt = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
        n = (tgt != IGNORE_INDEX).sum()

        def step() -> torch.Tensor:
            out = model(ids, return_hidden=True)
            total, _ = linear_cross_entropy(out.hidden, model.head_weight, tgt)
            loss = total / n
            return loss + out.aux_loss if out.aux_loss is not None else loss

        return step

    def step() -> torch.Tensor:
        out = model(input_ids=ids, labels=ids)
        return out.loss  # Mixtral's includes its weighted load-balancing loss

    return step


# ----------------------------------------------------------------------------- measures

GEMM_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::addmm_",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_grouped_mm",
}  # matrix products; their self time excludes what they call, so no op is counted twice


def cpu_peak_bytes(run) -> int:
    """Peak of the bytes torch's CPU allocator holds during `run()`, above the level before it
    (the CPU analogue of torch.cuda.max_memory_allocated): every allocation and free recorded
    by the profiler, replayed in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    cpu = torch._C._autograd.DeviceType.CPU
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == cpu
    )
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def gemm_share(run) -> float:
    """Fraction of `run()`'s operator time spent in matrix products (profiled, so approximate)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    rows = prof.key_averages()
    total = sum(r.self_cpu_time_total for r in rows)
    gemm = sum(r.self_cpu_time_total for r in rows if r.key in GEMM_OPS)
    return gemm / total if total else 0.0


class Worker:
    """One model in this process, stepped on command: the parent alternates two of these, so
    both see the same machine at the same moments."""

    def __init__(self, a: argparse.Namespace):
        pair, self.impl = a.worker.split(":")
        if a.threads:
            torch.set_num_threads(a.threads)
        self.dev = torch.device(a.device)
        self.bf16 = a.dtype == "bf16"
        torch.manual_seed(0)
        self.model = build(pair, self.impl, a.layers).to(self.dev).train()
        ids = torch.randint(0, SHAPE["vocab"], (a.batch, a.seq), device=self.dev)
        self.step_fn = step_fn(self.model, self.impl, ids)
        self.params = sum(p.numel() for p in self.model.parameters())

    def run(self) -> None:
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.step_fn()
        loss.backward()
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def step(self) -> dict:
        t0 = time.perf_counter()
        self.run()
        dt = time.perf_counter() - t0
        self.model.zero_grad(set_to_none=True)
        return {"step_s": dt}

    def memory(self) -> dict:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            self.run()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = cpu_peak_bytes(self.run)
        self.model.zero_grad(set_to_none=True)
        return {"peak_bytes": peak}

    def profile(self) -> dict:
        share = gemm_share(self.run)
        self.model.zero_grad(set_to_none=True)
        return {"gemm_share": share}

    def serve(self) -> None:
        print(json.dumps({"params": self.params}), flush=True)
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "quit":
                return
            print(json.dumps(getattr(self, cmd)()), flush=True)


class Remote:
    """A worker subprocess, driven over its stdin/stdout."""

    def __init__(self, a: argparse.Namespace, pair: str, impl: str, log: Path):
        self.name = f"{pair}:{impl}"
        self.log = log
        cmd = [sys.executable, __file__, "--worker", self.name]
        for flag in ("batch", "seq", "layers", "device", "dtype", "threads"):
            cmd += [f"--{flag}", str(getattr(a, flag))]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            env=os.environ.copy(),
        )
        self.params = self._read()["params"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise SystemExit(f"{self.name} failed:\n{self.log.read_text()[-3000:]}")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait()


def measure_pair(a: argparse.Namespace, pair: str, tmp: Path) -> dict:
    """Alternate the two implementations step by step (the one going first swaps each round),
    then measure each one's peak memory and, with --profile, its matrix-product share."""
    remotes = {impl: Remote(a, pair, impl, tmp / f"{pair}-{impl}.log") for impl in IMPLS}
    try:
        for r in remotes.values():
            r.ask("step")  # warm-up: allocators, kernels, caches
        times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
        for i in range(a.steps):
            for impl in IMPLS if i % 2 == 0 else IMPLS[::-1]:
                times[impl].append(remotes[impl].ask("step")["step_s"])
        res = {
            impl: dict(
                params=remotes[impl].params,
                step_s=statistics.median(times[impl]),
                times=times[impl],
                peak_bytes=remotes[impl].ask("memory")["peak_bytes"],
            )
            for impl in IMPLS
        }
        if a.profile:
            for impl in IMPLS:
                res[impl]["gemm_share"] = remotes[impl].ask("profile")["gemm_share"]
    finally:
        for r in remotes.values():
            r.close()
    ratios = [h / o for h, o in zip(times["hf"], times["ours"])]  # per round, same moment
    out = dict(
        pair=pair,
        ours=res["ours"],
        hf=res["hf"],
        speedup=statistics.median(ratios),
        speedup_range=[min(ratios), max(ratios)],
        memory_ratio=res["ours"]["peak_bytes"] / max(res["hf"]["peak_bytes"], 1),
    )
    if a.profile:
        # if everything but our matrix products took no time at all
        gemm_s = res["ours"]["step_s"] * res["ours"]["gemm_share"]
        out["ceiling"] = res["hf"]["step_s"] / gemm_s if gemm_s else float("inf")
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.worker:
        Worker(a).serve()
        return 0
    pairs = [x for x in a.pairs.split(",") if x]
    bad = [x for x in pairs if x not in ("dense", "moe")]
    if bad:
        raise SystemExit(f"--pairs: unknown pair {bad[0]!r} (choose from dense, moe)")
    if a.profile and a.device != "cpu":
        # an operator's CPU time on CUDA is its launch; kernel time would need the kernels'
        # names sorted into matmuls and the rest (our Triton kernels included): not done
        raise SystemExit("--profile measures CPU operator time: use it with --device cpu")
    print(
        f"SmolLM2-135M shape ({a.layers} layers), batch {a.batch} x seq {a.seq}, {a.dtype}, "
        f"{a.device}, torch threads {a.threads or torch.get_num_threads()}, "
        f"{a.steps} alternating rounds after one warm-up step each",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure_pair(a, pair, Path(tmp)) for pair in pairs]
    peer = {"dense": "LlamaForCausalLM", "moe": "MixtralForCausalLM"}
    head = (
        "| pair | ours step (s) | transformers step (s) | speed-up (range) | ours peak (MiB) "
        "| transformers peak (MiB) | memory ours/theirs |"
    )
    rule = "|---|---:|---:|---:|---:|---:|---:|"
    if a.profile:
        head += " ours in matmul | speed-up ceiling |"
        rule += "---:|---:|"
    print(head)
    print(rule)
    for x in results:
        lo, hi = x["speedup_range"]
        row = (
            f"| {x['pair']} vs {peer[x['pair']]} | {x['ours']['step_s']:.3f} "
            f"| {x['hf']['step_s']:.3f} | {x['speedup']:.2f}x ({lo:.2f}-{hi:.2f}) "
            f"| {x['ours']['peak_bytes'] / 2**20:.0f} | {x['hf']['peak_bytes'] / 2**20:.0f} "
            f"| {x['memory_ratio']:.2f} |"
        )
        if a.profile:
            row += f" {x['ours']['gemm_share']:.0%} | {x['ceiling']:.2f}x |"
        print(row)
    if a.json:
        import transformers

        Path(a.json).write_text(
            json.dumps(
                dict(
                    date=datetime.date.today().isoformat(),
                    machine=platform.machine(),
                    cpu_count=os.cpu_count(),
                    torch=torch.__version__,
                    transformers=transformers.__version__,
                    args=vars(a),
                    results=results,
                ),
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
