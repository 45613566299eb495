"""Benchmark the moe_kernels MoE layer against a dense-matmul floor measured in the same run.

For each shape and routing (balanced, Zipf-skewed) it prints forward and forward+backward
time of each backend, achieved FLOP/s, and the ratio to the floor: the same FLOPs done as
plain dense matmuls (the T*K assignment rows already grouped, one SwiGLU FFN, no routing).
Ratio = backend time / floor time, the median over rounds of the two times measured in the same
round (1.00 = as fast as dense; lower is better); times shown are the best of all rounds.

    python tools/bench_kernels.py                 # CPU shapes on CPU, GPU shapes on CUDA
    python tools/bench_kernels.py --device cuda --dtype bfloat16
    python tools/bench_kernels.py --shapes 2048,512,1024,8,2 --backends torch,loop

Shape legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import platform
import statistics
import sys
import time

import moe_kernels as mk
import torch
import torch.nn.functional as nnf

CPU_SHAPES = [(2048, 512, 1024, 8, 2), (2048, 256, 256, 64, 8)]
GPU_SHAPES = [(16384, 4096, 14336, 8, 2), (16384, 2048, 1024, 64, 8)]  # Mixtral, OLMoE


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def time_interleaved(cands: dict, device, repeats: int, warmup: int = 2) -> dict:
    """Wall times of every candidate fn, run round-robin `repeats` times so that load from
    other processes hits all candidates alike. Returns {name: (best, samples, peak)}: the
    minimum time (noise only ever adds time), the per-round samples (for paired ratios),
    and peak GPU memory of one call (None on CPU)."""
    peak = {}
    for name, fn in cands.items():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            fn()
        _sync(device)
        peak[name] = (torch.cuda.max_memory_allocated(device) / 2**30
                      if device.type == "cuda" else None)
    samples = {name: [] for name in cands}
    for _ in range(repeats):
        for name, fn in cands.items():
            samples[name].append(_time_once(fn, device))
    return {name: (min(samples[name]), samples[name], peak[name]) for name in cands}


def paired_ratio(samples: list, base: list) -> float:
    """Median over rounds of candidate time / base time in the same round. A shared
    machine drifts between fast and slow phases that last seconds; a ratio of two
    measurements taken a few milliseconds apart cancels the phase, a ratio of two
    minima taken at different moments does not."""
    return statistics.median(a / b for a, b in zip(samples, base))


def make_routing(T, E, K, kind, device, gen):
    """Balanced: token t gets experts (t*K + j) mod E (every expert exactly T*K/E rows when
    E divides T*K). Skewed: K distinct experts per token drawn with Zipf(1.2) popularity."""
    if kind == "balanced":
        t = torch.arange(T).unsqueeze(1)
        j = torch.arange(K).unsqueeze(0)
        ids_TK = (t * K + j) % E  # distinct within a token since K <= E
    else:
        p_E = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
        ids_TK = torch.multinomial(p_E.expand(T, E), K, replacement=False, generator=gen)
    w_TK = torch.rand(T, K, generator=gen) + 0.1
    w_TK = w_TK / w_TK.sum(1, keepdim=True)
    return ids_TK.to(device), w_TK.to(device)


def flops_fwd(T, D, F, K):
    return 2.0 * T * K * D * F * 3  # three (rows x D x F) matmuls per assignment


# "torch-unchunked": the torch backend with the CPU chunking off, i.e. whole-tensor
# grouped_mm calls as on CUDA; kept to show what the chunked CPU path gains, in the same run.
UNCHUNKED = "torch-unchunked"
# the module, not the function of the same name that moe_kernels exports
moe_mlp_mod = importlib.import_module("moe_kernels.moe_mlp")


def _base(backend: str) -> str:
    return "torch" if backend == UNCHUNKED else backend


@contextlib.contextmanager
def _variant(backend: str):
    if backend != UNCHUNKED:
        yield
        return
    saved, moe_mlp_mod.CPU_CHUNK_BYTES = moe_mlp_mod.CPU_CHUNK_BYTES, None
    try:
        yield
    finally:
        moe_mlp_mod.CPU_CHUNK_BYTES = saved


# "gemms-only" (CPU): the layer's GEMMs alone, one torch.mm per expert on rows already in
# expert order, with this routing's per-expert counts; no routing, gather, SwiGLU or combine.
# Its ratio to the floor is what unequal expert sizes cost before any MoE bookkeeping.
GEMMS_ONLY = "gemms-only"


def _gemms_only(xf, w1, w3, w2, ids, dyf):
    E, D, F = w1.shape
    bounds = [0] + torch.bincount(ids.reshape(-1).cpu(), minlength=E).cumsum(0).tolist()
    segs = [(e, bounds[e], bounds[e + 1]) for e in range(E) if bounds[e + 1] > bounds[e]]
    w1, w3, w2 = w1.detach(), w3.detach(), w2.detach()
    h = xf.new_empty(xf.shape[0], F)
    o = xf.new_empty(xf.shape[0], D)
    dw = w1.new_empty(E, D, F)

    def fwd():
        for w in (w1, w3):
            for e, a, b in segs:
                torch.mm(xf[a:b], w[e], out=h[a:b])
        for e, a, b in segs:
            torch.mm(h[a:b], w2[e], out=o[a:b])

    def fb():  # forward, then dX (x3) and dW (x3): nine GEMMs per expert
        fwd()
        for e, a, b in segs:
            torch.mm(dyf[a:b], w2[e].t(), out=h[a:b])
            torch.mm(h[a:b].t(), dyf[a:b], out=dw[e].view(F, D))
            for w in (w1, w3):
                torch.mm(h[a:b], w[e].t(), out=o[a:b])
                torch.mm(xf[a:b].t(), h[a:b], out=dw[e])
    return fwd, fb


def bench_shape(shape, routing, backends, device, dtype, repeats, gen):
    T, D, F, E, K = shape
    x = torch.randn(T, D, generator=gen).to(device, dtype)
    w1 = (torch.randn(E, D, F, generator=gen) / D**0.5).to(device, dtype)
    w3 = (torch.randn(E, D, F, generator=gen) / D**0.5).to(device, dtype)
    w2 = (torch.randn(E, F, D, generator=gen) / F**0.5).to(device, dtype)
    ids, wts = make_routing(T, E, K, routing, device, gen)
    params = [p.requires_grad_() for p in (x, w1, w3, w2, wts)]
    dy = torch.randn(T, D, generator=gen).to(device, dtype)

    # Floor: same FLOPs as dense matmuls, rows already grouped, no routing.
    xf = torch.randn(T * K, D, generator=gen).to(device, dtype).requires_grad_()
    f1, f3 = w1[0].detach().clone().requires_grad_(), w3[0].detach().clone().requires_grad_()
    f2 = w2[0].detach().clone().requires_grad_()
    dyf = torch.randn(T * K, D, generator=gen).to(device, dtype)

    def floor_fwd():
        with torch.no_grad():
            return (nnf.silu(xf @ f1) * (xf @ f3)) @ f2

    def floor_fb():
        y = (nnf.silu(xf @ f1) * (xf @ f3)) @ f2
        torch.autograd.grad(y, (xf, f1, f3, f2), dyf)

    fl = flops_fwd(T, D, F, K)
    cands = {"floor(dense)": (floor_fwd, floor_fb)}
    if device.type == "cpu" and GEMMS_ONLY in backends:
        cands[GEMMS_ONLY] = _gemms_only(xf.detach(), w1, w3, w2, ids, dyf)
    for b in (b for b in backends if b != GEMMS_ONLY):
        def fwd(b=b):
            with torch.no_grad(), _variant(b):
                return mk.moe_mlp(x, w1, w3, w2, ids, wts, backend=_base(b))

        def fb(b=b):
            with _variant(b):
                y = mk.moe_mlp(*params[:4], ids, params[4], backend=_base(b))
                torch.autograd.grad(y, params, dy)

        cands[b] = (fwd, fb)
    res_f = time_interleaved({n: f for n, (f, _) in cands.items()}, device, repeats)
    res_b = time_interleaved({n: g for n, (_, g) in cands.items()}, device, repeats)
    fl_f, fl_b = res_f["floor(dense)"][1], res_b["floor(dense)"][1]
    rows = [(n, res_f[n][0], res_b[n][0], res_b[n][2], paired_ratio(res_f[n][1], fl_f),
             paired_ratio(res_b[n][1], fl_b)) for n in cands]

    # Routing cost: fused softmax+top-k and the plan, from logits.
    logits = torch.randn(T, E, generator=gen).to(device)
    rb = "triton" if (device.type == "cuda" and mk.HAS_TRITON) else "torch"
    t_route = time_interleaved(
        {"r": lambda: mk.plan(mk.topk_route(logits, K, backend=rb)[1], E, backend=rb)},
        device, repeats)["r"][0]

    print(f"\n### T={T} D={D} F={F} E={E} K={K}, routing={routing}, dtype={str(dtype)[6:]}")
    print(f"fwd FLOPs {fl / 1e9:.2f} G, fwd+bwd FLOPs {3 * fl / 1e9:.2f} G; "
          f"routing ({rb}: top-k + plan) {t_route * 1e3:.2f} ms")
    print("| backend | fwd ms | fwd TFLOP/s | fwd / floor | fwd+bwd ms | fwd+bwd TFLOP/s "
          "| fwd+bwd / floor | peak GiB (fwd+bwd) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, tf, tb, peak, rf, rb_ in rows:
        pk = f"{peak:.2f}" if peak is not None else "n/a (CPU)"
        print(f"| {name} | {tf * 1e3:.1f} | {fl / tf / 1e12:.3f} | {rf:.2f}x | "
              f"{tb * 1e3:.1f} | {3 * fl / tb / 1e12:.3f} | {rb_:.2f}x | {pk} |")
    sys.stdout.flush()
    return rows, t_route


def check_no_sync(device, dtype):
    """The triton path must not synchronise with the host (GPU only)."""
    T, D, F, E, K = 256, 256, 512, 8, 2
    x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
    ws = [torch.randn(E, D, F, device=device, dtype=dtype, requires_grad=True) for _ in range(2)]
    w2 = torch.randn(E, F, D, device=device, dtype=dtype, requires_grad=True)
    logits = torch.randn(T, E, device=device)
    mk.moe_mlp(x, ws[0], ws[1], w2, *reversed(mk.topk_route(logits, K)), backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        wts, ids = mk.topk_route(logits, K, backend="triton")
        y = mk.moe_mlp(x, ws[0], ws[1], w2, ids, wts, backend="triton")
        y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    print("sync-debug mode 'error': triton path raised nothing")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU)")
    ap.add_argument("--shapes", nargs="*", default=None, help="T,D,F,E,K ...")
    ap.add_argument("--backends", default=None, help="comma list; default by device")
    ap.add_argument("--routing", default="balanced,skewed")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    else:
        shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    backends = (args.backends.split(",") if args.backends
                else (["triton", "torch", "loop"] if device.type == "cuda"
                      else ["torch", UNCHUNKED, "loop", GEMMS_ONLY]))
    gen = torch.Generator().manual_seed(0)
    dev_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"{platform.processor() or platform.machine()} CPU, "
                     f"{torch.get_num_threads()} threads")
    print(f"# moe_kernels benchmark: {dev_name}; torch {torch.__version__}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# command: python tools/bench_kernels.py {' '.join(argv or sys.argv[1:])}".rstrip())
    for shape in shapes:
        for routing in args.routing.split(","):
            bench_shape(shape, routing, backends, device, dtype, args.repeats, gen)
    if device.type == "cuda" and "triton" in backends:
        check_no_sync(device, dtype)


if __name__ == "__main__":
    main()
