"""One training step (forward + backward) of our model vs transformers', at SmolLM2-135M's shape.

Pairs, each with random weights of the same shapes:
    dense  moe-forge `Transformer`           vs `LlamaForCausalLM`
    moe    moe-forge MoE (8 experts, top-2)  vs `MixtralForCausalLM` (8 experts, top-2)
SmolLM2-135M: hidden 576, 30 layers, 9 heads, 3 key/value heads, SwiGLU 1536, vocabulary 49152,
tied embeddings. Every MoE expert is as wide as the dense FFN (what `moe split --method copy`
makes of SmolLM2), and both MoEs add their router's load-balancing loss.

A step is what training does per batch: the loss of every position (ours: the chunked
cross-entropy of moe.model.loss, as training uses it; transformers: `labels=`, its own loss) and
its backward, gradients freed afterwards. Each model runs in a fresh subprocess, so peak memory
is its own: on CPU the rise of the resident set during the step (the kernel's peak, reset before
each step through /proc/self/clear_refs), on CUDA torch.cuda.max_memory_allocated above what was
allocated before the step. Reported: median step time, ratio transformers / ours (> 1: ours is
faster), peak memory of each.

    python tools/bench_pretrained.py                      # batch 1, seq 256, 3 timed steps
    python tools/bench_pretrained.py --batch 2 --steps 5 --json out.json
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
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
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


# ----------------------------------------------------------------------------- memory


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Peak bytes above the level before each step (CPU: resident set; CUDA: allocator)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.base = 0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM)
            self.base = _proc_kib("VmRSS") * 1024

    def stop(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _proc_kib("VmHWM") * 1024 - self.base


def worker(a: argparse.Namespace) -> dict:
    pair, impl = a.worker.split(":")
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    model = build(pair, impl, a.layers).to(dev).train()
    ids = torch.randint(0, SHAPE["vocab"], (a.batch, a.seq), device=dev)
    step = step_fn(model, impl, ids)
    mem = PeakMemory(dev)
    times, peaks = [], []
    for i in range(a.steps + 1):
        mem.start()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            loss = step()
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = mem.stop()
        model.zero_grad(set_to_none=True)
        del loss
        if i:  # the first step warms up allocators and kernels
            times.append(dt)
            peaks.append(peak)
    n_params = sum(p.numel() for p in model.parameters())
    return dict(
        pair=pair,
        impl=impl,
        params=n_params,
        step_s=statistics.median(times),
        times=times,
        peak_bytes=max(peaks),
    )


def run_worker(a: argparse.Namespace, pair: str, impl: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        f"{pair}:{impl}",
        "--batch",
        str(a.batch),
        "--seq",
        str(a.seq),
        "--steps",
        str(a.steps),
        "--layers",
        str(a.layers),
        "--device",
        a.device,
        "--dtype",
        a.dtype,
        "--threads",
        str(a.threads),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if p.returncode != 0:
        raise SystemExit(f"{pair}:{impl} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return 0
    pairs = [x for x in a.pairs.split(",") if x]
    results = []
    print(
        f"SmolLM2-135M shape ({a.layers} layers), batch {a.batch} x seq {a.seq}, {a.dtype}, "
        f"{a.device}, torch threads {a.threads or torch.get_num_threads()}, "
        f"median of {a.steps} steps",
        file=sys.stderr,
    )
    for pair in pairs:
        r = {impl: run_worker(a, pair, impl) for impl in IMPLS}
        ratio = r["hf"]["step_s"] / r["ours"]["step_s"]
        mem_ratio = r["ours"]["peak_bytes"] / max(r["hf"]["peak_bytes"], 1)
        results.append(
            dict(pair=pair, ours=r["ours"], hf=r["hf"], speedup=ratio, memory_ratio=mem_ratio)
        )
    peer = {"dense": "LlamaForCausalLM", "moe": "MixtralForCausalLM"}
    print(
        "| pair | ours step (s) | transformers step (s) | speed-up | ours peak (MiB) "
        "| transformers peak (MiB) | memory ours/theirs |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for x in results:
        print(
            f"| {x['pair']} vs {peer[x['pair']]} | {x['ours']['step_s']:.3f} "
            f"| {x['hf']['step_s']:.3f} | {x['speedup']:.2f}x "
            f"| {x['ours']['peak_bytes'] / 2**20:.0f} | {x['hf']['peak_bytes'] / 2**20:.0f} "
            f"| {x['memory_ratio']:.2f} |"
        )
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
