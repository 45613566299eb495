"""Compile every Triton kernel of moe_kernels for real GPUs on a machine without one, and report.

The launchers' whole path (top-k routing, plan, the MoE layer's forward and backward) is run on
meta tensors inside `moe_kernels._launch.record_launches(arch)`, which records each launch
(kernel, config, arguments) instead of running it. Each distinct launch is then compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`, with the argument
specialisation (dtypes, unit strides, 16-byte divisibility) that triton's own launcher would
derive from those arguments. Per kernel x config x arch it reports: compiled or the compiler's
error; registers (cuobjdump -res-usage of the cubin); spill bytes (ptxas -v, the ptxas triton
uses for that arch, run again on the PTX with triton's flags); shared memory against the
architecture's opt-in limit; and whether every tl.dot runs on tensor cores (TTGIR: mma v2 on
sm_80, warp_group_dot on sm_90, tc_gen5_mma on sm_100; SASS: HMMA, HGMMA, UTC*MMA).

    python tools/gpu_compile_report.py                  # full sweep; writes docs/benchmarks.md
    python tools/gpu_compile_report.py --no-write --archs 90 --dtypes bf16
    python tools/gpu_compile_report.py --check          # exit 1 when a target is missed

Targets (from issue #18): every launchable config compiles on every listed arch; zero spill
bytes at the configs the launchers pick for the benchmark shapes; shared memory within the
arch's limit at the chosen num_stages; bf16/fp16 GEMMs on tensor cores (wgmma/HGMMA on sm_90).

Shape legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")

import torch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ARCHS = (80, 90, 100)
# Multiprocessors of the part each arch is recorded as (A100, H100 SXM, B200): the dW split
# factor depends on it, and with it the dtype of the dW partials.
SMS = {80: 108, 90: 132, 100: 148}
TC_NAME = {80: "HMMA", 90: "HGMMA", 100: "tcgen05"}
SECTION_BEGIN = "<!-- gpu-compile-report:begin -->"
SECTION_END = "<!-- gpu-compile-report:end -->"


def _bench_shapes():
    try:
        from bench_kernels import GPU_SHAPES
    except Exception:  # pragma: no cover - run from elsewhere
        GPU_SHAPES = [(16384, 4096, 14336, 8, 2), (16384, 2048, 1024, 64, 8)]
    return GPU_SHAPES


# (name, T, D, F, E, K, is a benchmark shape). The two small shapes reach the tile classes the
# benchmark shapes do not: few rows per expert, and an output only 64 wide.
SHAPES = [
    ("Mixtral", *_bench_shapes()[0], True),
    ("OLMoE", *_bench_shapes()[1], True),
    ("small", 64, 64, 256, 8, 2, False),
    ("tall-narrow", 4096, 64, 256, 8, 2, False),
    # strides not multiples of 16 elements: no 16-byte divisibility to specialise on
    ("odd", 100, 200, 300, 5, 2, False),
]


# --------------------------------------------------------------------------- availability


def cuda_target_problem() -> str | None:
    """None when this triton build can compile for CUDA here, else why not."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1: the kernels are interpreter functions, nothing to compile"
    try:
        import triton  # noqa: F401
        from triton.backends import backends
        from triton.backends.nvidia.compiler import get_ptxas
    except Exception as e:  # ImportError, or a triton without the NVIDIA backend
        return f"triton's NVIDIA backend cannot be imported: {type(e).__name__}: {e}"
    if "nvidia" not in backends:
        return "this triton build has no NVIDIA backend"
    try:
        for arch in (80, 90):
            subprocess.run([get_ptxas(arch).path, "--version"], check=True,
                           capture_output=True, timeout=60)
    except Exception as e:
        return f"ptxas from triton's wheel does not run here: {type(e).__name__}: {e}"
    import moe_kernels as mk

    if not mk.HAS_TRITON:
        return "moe_kernels could not import triton"
    return None


# First CUDA release whose ptxas knows each arch (sm_90a: 12.0, sm_100a: 12.8).
PTXAS_MIN = {80: (11, 0), 90: (12, 0), 100: (12, 8), 103: (12, 9), 120: (12, 8)}


def arch_problem(arch: int) -> str | None:
    """None when this triton (its backend and the ptxas it uses for the arch) can target
    sm_<arch>, else why not."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.compiler import make_backend

        make_backend(GPUTarget("cuda", arch, 32)).parse_options({})
        tool = get_ptxas(arch)
        ver = tuple(int(v) for v in str(tool.version).split(".")[:2])
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    need = PTXAS_MIN.get(arch)
    if need is None:
        return f"sm_{arch} is not one this report knows"
    if ver < need:
        return f"{pathlib.Path(tool.path).name} {tool.version} predates sm_{arch}"
    return None


# --------------------------------------------------------------------------- launches


def record_layer(T, D, F, E, K, dtype, arch, sms=None):
    """Every launch of routing + plan + forward + backward of the MoE layer (triton backend),
    recorded on meta tensors as if on sm_<arch>."""
    from moe_kernels._launch import layer_on_meta, record_launches

    with record_launches(arch, sms or SMS.get(arch, 132)) as launches:
        layer_on_meta(T, D, F, E, K, dtype)
    return list(launches)


def variant(launch) -> str:
    """The argument specialisations that change the compiled code, in words."""
    c, a = launch.constexprs, launch.args
    out = []
    if c.get("HAS_GATHER"):
        out.append("gather")
    if launch.name == "_grouped_mm_kernel" and a["stride_wd"] == 1:
        out.append("w^T")
    if launch.name == "_grouped_dw_kernel":
        out.append(f"S={a['S']}" + (" fp32 partials" if a["dw_ptr"].dtype == torch.float32
                                    else ""))
    if "HAS_W" in c:
        out.append("weighted" if c["HAS_W"] else "sum")
    for k in ("K", "E_PAD"):
        if k in c:
            out.append(f"{k}={c[k]}")
    return ", ".join(out)


def config_str(launch) -> str:
    blocks = [f"{v}" for k, v in launch.constexprs.items() if k.startswith("BLOCK")]
    return f"{'x'.join(blocks)} w{launch.num_warps} s{launch.num_stages}"


@dataclass
class Job:
    """One compile: plain data, so it can go to a worker process."""

    module: str
    kernel: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    stage_bytes: int  # bytes of one pipeline stage of the dot operands (0: no dot)
    key: tuple = ()
    row: tuple = ()  # (kernel, variant, config, dtype): the report row across archs
    calls: set = field(default_factory=set)
    bench: bool = False
    dtypes: set = field(default_factory=set)  # the layer dtypes that launch it


def _stage_bytes(launch) -> int:
    c = launch.constexprs
    es = launch.args["x_ptr"].element_size() if "x_ptr" in launch.args else 0
    if launch.name == "_grouped_mm_kernel":
        return (c["BLOCK_M"] * c["BLOCK_K"] + c["BLOCK_K"] * c["BLOCK_N"]) * es
    if launch.name == "_grouped_dw_kernel":
        return (c["BLOCK_D"] * c["BLOCK_M"] + c["BLOCK_M"] * c["BLOCK_F"]) * es
    return 0


def make_job(launch, arch: int, dtype_name: str) -> Job:
    """The signature, constexprs and attributes triton's launcher would compile for this
    launch on sm_<arch> (its own binder and _pack_args, as JITFunction.run does)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kw = dict(num_warps=launch.num_warps, num_stages=launch.num_stages, debug=fn.debug)
    bound, spec, opts = binder(**launch.args, **launch.constexprs, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    key = (fn.__name__, arch, tuple(sorted(signature.items())),
           tuple(sorted((k, repr(v)) for k, v in constexprs.items())),
           tuple(sorted((k, repr(v)) for k, v in attrs.items())),
           launch.num_warps, launch.num_stages)
    names = fn.arg_names
    spec = (tuple(sorted(signature.items())),
            tuple(sorted((names[k[0]], repr(v)) for k, v in constexprs.items())),
            tuple(sorted((names[k[0]], repr(v)) for k, v in attrs.items() if v)),
            launch.num_warps, launch.num_stages)
    row = (fn.__name__, variant(launch), config_str(launch), dtype_name, spec)
    return Job(fn.__module__, fn.__name__, arch, signature, constexprs, attrs,
               dict(options.__dict__), _stage_bytes(launch), key, row)


def collect_jobs(shapes, dtypes, archs) -> list[Job]:
    jobs: dict[tuple, Job] = {}
    for dname in dtypes:
        for arch in archs:
            for name, T, D, F, E, K, bench in shapes:
                for launch in record_layer(T, D, F, E, K, DTYPES[dname], arch):
                    job = make_job(launch, arch, dname)
                    job = jobs.setdefault(job.key, job)
                    job.calls.add((name, launch.what or launch.name))
                    job.dtypes.add(dname)
                    job.bench = job.bench or bench
    return list(jobs.values())


# --------------------------------------------------------------------------- compile


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def _ptxas_verbose(ptx: str, arch: int, options: dict) -> str:
    """ptxas -v on triton's PTX with the flags triton's make_cubin passes."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = pathlib.Path(d) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(src) + ".o"]
        if not options.get("enable_fp_fusion", True):
            cmd.insert(2, "--fmad=false")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return out.stdout + out.stderr


def _res_usage(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as d:
        p = pathlib.Path(d) / "k.cubin"
        p.write_bytes(cubin)
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", str(p)], capture_output=True,
                             text=True, timeout=120).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return {} if m is None else dict(zip(("reg", "stack", "static_shared", "local"),
                                         map(int, m.groups())))


def _dots(ttir: str, ttgir: str) -> dict:
    """tl.dot ops in the source (TTIR) and how the GPU IR lowers each of them."""
    n_src = len(re.findall(r"= tt\.dot ", ttir))
    mma_aliases = set(re.findall(r"^(#\w+) = #ttg\.nvidia_mma<", ttgir, re.M))
    v2 = fma = 0
    for line in ttgir.splitlines():
        if re.search(r"= tt\.dot ", line):
            enc = re.search(r"-> tensor<[^>]*?,\s*(#\w+)[^>]*>", line)
            if enc and enc.group(1) in mma_aliases:
                v2 += 1
            else:
                fma += 1
    wgmma = len(re.findall(r"ttng\.warp_group_dot ", ttgir))
    tc5 = len(re.findall(r"ttng\.tc_gen5_mma ", ttgir))
    return dict(src=n_src, mma_v2=v2, fma=fma, wgmma=wgmma, tcgen05=tc5)


def compile_job(job: Job) -> dict:
    """Compile one job and measure it; never raises (errors are part of the report)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job.module), job.kernel)
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn, job.signature, job.constexprs, job.attrs),
                           target=GPUTarget("cuda", job.arch, 32), options=job.options)
    except Exception as e:
        msg = " ".join(str(e).split())
        return dict(ok=False, error=f"{type(e).__name__}: {msg[:300]}",
                    seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    log = _ptxas_verbose(k.asm["ptx"], job.arch, job.options)
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                  log)
    regs = re.search(r"Used (\d+) registers", log)
    sass = k.asm["sass"]
    ops = {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("HMMA", "HGMMA", "LDGSTS")}
    ops["UTCMMA"] = len(re.findall(r"\bUTC\w*MMA\b", sass))
    return dict(
        ok=True, seconds=seconds, shared=int(k.metadata.shared or 0),
        stack=int(m.group(1)) if m else None,
        spill_stores=int(m.group(2)) if m else None,
        spill_loads=int(m.group(3)) if m else None,
        ptxas_regs=int(regs.group(1)) if regs else None,
        res=_res_usage(k.asm["cubin"]), dots=_dots(k.asm["ttir"], k.asm["ttgir"]), sass=ops,
        ptxas_log=None if m else log[-2000:],
    )


def run_jobs(jobs: list[Job], n_workers: int, progress=None) -> list[dict]:
    if n_workers <= 1:
        out = []
        for i, j in enumerate(jobs):
            out.append(compile_job(j))
            if progress:
                progress(i + 1, len(jobs), j)
        return out
    import multiprocessing as mp

    results: list = [None] * len(jobs)
    with cf.ProcessPoolExecutor(n_workers, mp_context=mp.get_context("spawn")) as ex:
        futs = {ex.submit(compile_job, j): i for i, j in enumerate(jobs)}
        for n, f in enumerate(cf.as_completed(futs), 1):
            results[futs[f]] = f.result()
            if progress:
                progress(n, len(jobs), jobs[futs[f]])
    return results


# --------------------------------------------------------------------------- targets


def registers(res: dict) -> int | None:
    return res["res"].get("reg", res.get("ptxas_regs")) if res.get("ok") else None


def tensor_cores(job: Job, res: dict) -> str:
    """'-' (no dot), the tensor-core path every dot takes, or what is wrong."""
    d = res["dots"]
    if d["src"] == 0:
        return "-"
    if d["fma"] and not (d["mma_v2"] or d["wgmma"] or d["tcgen05"]):
        return "FMA (ieee fp32)"
    parts = []
    if d["mma_v2"]:
        parts.append("HMMA" if res["sass"]["HMMA"] else "mma v2, no HMMA in SASS")
    if d["wgmma"]:
        parts.append("HGMMA" if res["sass"]["HGMMA"] else "wgmma, no HGMMA in SASS")
    if d["tcgen05"]:
        parts.append("tcgen05" if res["sass"]["UTCMMA"] else "tcgen05, no UTC*MMA in SASS")
    if d["fma"]:
        parts.append(f"{d['fma']} dot(s) on FMA")
    return " + ".join(parts)


def misses(job: Job, res: dict) -> list[str]:
    """The targets this compile misses (empty: all met)."""
    from moe_kernels._launch import smem_limit

    if not res.get("ok"):
        return [f"does not compile: {res['error']}"]
    out = []
    if res["spill_stores"] is None:
        out.append("ptxas -v printed no spill line")
    elif job.bench and (res["spill_stores"] or res["spill_loads"]):
        out.append(f"spills {res['spill_stores']} B stores / {res['spill_loads']} B loads")
    if res["shared"] > smem_limit(job.arch):
        out.append(f"shared memory {res['shared']} B > limit {smem_limit(job.arch)} B")
    sixteen = bool(job.dtypes & {"bf16", "fp16"}) or job.row[3] in ("bf16", "fp16")
    d = res["dots"]
    if sixteen and d["src"]:
        want = TC_NAME[job.arch] if job.arch in TC_NAME else None
        got = tensor_cores(job, res)
        if d["fma"] or (want and got != want):
            out.append(f"tensor cores: wanted {want} for every dot, got {got}")
    return out


# --------------------------------------------------------------------------- report


def _cell(job: Job | None, res: dict | None) -> str:
    from moe_kernels._launch import smem_limit

    if job is None:
        return "-"
    if not res.get("ok"):
        return f"**error**: {res['error'][:120]}"
    spill = res["spill_stores"]
    spill_s = "?" if spill is None else (
        f"{spill}" if not (spill or res["spill_loads"]) else f"**{spill}/{res['spill_loads']}**")
    kb = res["shared"] / 1024
    lim = smem_limit(job.arch) // 1024
    smem = f"{kb:.0f}/{lim}K" if kb <= lim else f"**{kb:.0f}/{lim}K**"
    if job.stage_bytes and res["shared"]:
        smem += f" ({res['shared'] // job.stage_bytes} buf)"
    tc = tensor_cores(job, res)
    s = f"{registers(res)} r, {spill_s} B, {smem}"
    if tc != "-":
        s += f", {tc}"
    if misses(job, res):
        s += " ✗"
    return s


def _spec_diff(row, twins) -> str:
    """What sets this row's specialisation apart from rows with the same label: the
    arguments whose type, value or divisibility attribute differ."""
    def facts(r):
        sig, cx, attrs = dict(r[4][0]), dict(r[4][1]), dict(r[4][2])
        return {k: (sig.get(k), cx.get(k), attrs.get(k)) for k in set(sig) | set(cx) | set(attrs)}

    mine = facts(row)
    differ = sorted({k for t in twins if t != row for k, v in facts(t).items()
                     if mine.get(k) != v})
    names = []
    for k in differ:
        sig_t, cx_v, at = mine.get(k, (None, None, None))
        names.append(f"{k}={cx_v}" if cx_v is not None else
                     f"{k}:{sig_t}{'/16' if at else ''}")
    return "(" + ", ".join(names[:4]) + ")"


def render(jobs, results, archs, cmd, elapsed) -> str:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    by_row: dict = {}
    for j, r in zip(jobs, results):
        by_row.setdefault(j.row, {})[j.arch] = (j, r)
    ptxas = sorted({f"sm_{a}: {pathlib.Path(get_ptxas(a).path).name} "
                    f"{get_ptxas(a).version}" for a in archs})
    n_fail = sum(bool(misses(j, r)) for j, r in zip(jobs, results))
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        SECTION_BEGIN,
        f"Date {now:%Y-%m-%d %H:%M} UTC; triton {triton.__version__}, torch {torch.__version__}"
        f"; {'; '.join(ptxas)}. Command: `{cmd}` ({len(jobs)} compiles, {elapsed:.0f} s).",
        "",
        "Written by `tools/gpu_compile_report.py`; nothing here ran on a GPU. The layer's launch "
        "path (top-k, plan, forward, backward; triton backend) is run on meta tensors with "
        "launches recorded, for each shape below, dtype and architecture; each distinct launch "
        "is compiled with `triton.compile(ASTSource(...), target=GPUTarget('cuda', arch, 32))` "
        "with the argument specialisation triton's launcher would use. Shapes (T, D, F, E, K): "
        + "; ".join(f"{n} {T},{D},{F},{E},{K}{' (benchmark)' if b else ''}"
                    for n, T, D, F, E, K, b in SHAPES) + ".",
        "",
        f"Targets missed: **{n_fail}** of {len(jobs)} compiles."
        + (" (Every launchable config compiles on every listed arch; zero spills at the "
           "benchmark shapes; shared memory within limits; 16-bit GEMMs on tensor cores, "
           "HGMMA on sm_90.)" if n_fail == 0 else ""),
        "",
    ]
    for j, r in zip(jobs, results):
        for m in misses(j, r):
            lines.append(f"- ✗ {j.row[0]} [{j.row[1]}] {j.row[2]} {j.row[3]} sm_{j.arch}: {m}")
    if n_fail:
        lines.append("")
    for dname in DTYPES:
        lines += summary(jobs, results, archs, dname)
    lines += ["<details><summary>Every compile: kernel x specialisation x config x arch "
              f"({len(by_row)} rows)</summary>", "",
              "Cell: registers per thread (cuobjdump -res-usage), spill stores in bytes "
              "(ptxas -v; stores/loads in bold when non-zero), shared memory of one block "
              "against the arch's opt-in limit (for GEMMs, how many operand stages that "
              "holds: the K loop's pipeline buffers), and the unit every tl.dot runs on "
              "(HMMA: mma.sync tensor cores; HGMMA: Hopper wgmma; tcgen05: Blackwell; FMA: "
              "fp32 with input_precision='ieee', no tensor cores by design). ✗: a target "
              "missed. Config: block sizes, warps, stages. Variant: the specialisations that "
              "change the code (gather: rows of x through an index; w^T: a transposed weight "
              "view; S: dW split factor; in brackets, where two rows would read the same, "
              "the arguments whose type or 16-divisibility differs).", ""]
    head = "| kernel | variant | dtype | config | used by | " + " | ".join(
        f"sm_{a}" for a in archs) + " |"
    lines += [head, "|" + "---|" * (5 + len(archs))]
    order = KERNEL_ORDER
    labels: dict = {}
    for row in by_row:
        labels.setdefault(row[:4], []).append(row)
    for row in sorted(by_row, key=lambda r: (order.index(r[0]) if r[0] in order else 99,
                                             list(DTYPES).index(r[3]), r[1], r[2], r[4])):
        cells = by_row[row]
        var = row[1] or "-"
        twins = labels[row[:4]]
        if len(twins) > 1:  # same label, different specialisation: say which
            var += " " + _spec_diff(row, twins)
        calls: dict = {}
        for j, _ in cells.values():
            for shape, what in j.calls:
                calls.setdefault(what, set()).add(shape)
        used = "; ".join(f"{w} ({', '.join(sorted(s))})" for w, s in sorted(calls.items()))
        dts = set().union(*(j.dtypes or {j.row[3]} for j, _ in cells.values()))
        dts_s = ", ".join(d for d in DTYPES if d in dts)
        lines.append(f"| `{row[0]}` | {var} | {dts_s} | {row[2]} | {used} | "
                     + " | ".join(_cell(*cells.get(a, (None, None))) for a in archs) + " |")
    lines += ["", "</details>", "", SECTION_END]
    return "\n".join(lines) + "\n"


KERNEL_ORDER = ["_topk_route_kernel", "_histogram_kernel", "_scatter_kernel",
                "_grouped_mm_kernel", "_combine_kernel", "_combine_bwd_kernel",
                "_grouped_dw_kernel"]


def summary(jobs, results, archs, dtype: str = "bf16") -> list[str]:
    """Per kernel, over its launches at the benchmark shapes in one dtype: registers (range),
    worst spill, largest shared memory, tensor-core path; one column per arch."""
    from moe_kernels._launch import smem_limit

    cells: dict = {}
    for j, r in zip(jobs, results):
        if j.bench and dtype in (j.dtypes or {j.row[3]}) and r.get("ok"):
            cells.setdefault((j.row[0], j.arch), []).append((j, r))
    if not cells:
        return []
    out = [f"Per kernel at the benchmark shapes ({', '.join(s[0] for s in SHAPES if s[6])}), "
           f"{dtype}, every call of the layer's forward and backward: registers (range over "
           "the calls), spill bytes (worst), shared memory (largest, of the limit), tensor "
           "cores.", "",
           "| kernel | configs | " + " | ".join(f"sm_{a}" for a in archs) + " |",
           "|" + "---|" * (2 + len(archs))]
    for name in KERNEL_ORDER:
        row = []
        configs = set()
        for a in archs:
            got = cells.get((name, a))
            if not got:
                row.append("-")
                continue
            regs = [registers(r) for _, r in got]
            spill = max(max(r["spill_stores"] or 0, r["spill_loads"] or 0) for _, r in got)
            smem = max(r["shared"] for _, r in got)
            tcs = sorted({tensor_cores(j, r) for j, r in got} - {"-"})
            configs |= {j.row[2] for j, _ in got}
            reg_s = f"{min(regs)}" if min(regs) == max(regs) else f"{min(regs)}-{max(regs)}"
            row.append(f"{reg_s} r, {spill} B spill, {smem / 1024:.0f}/"
                       f"{smem_limit(a) // 1024} KB" + (f", {'/'.join(tcs)}" if tcs else ""))
        out.append(f"| `{name}` | {'; '.join(sorted(configs))} | " + " | ".join(row) + " |")
    return out + [""]


SECTION_TITLE = "## GPU compile check (offline, no GPU)"


def write_section(path: pathlib.Path, text: str) -> None:
    """Replace the generated part of this tool's section (between its markers; the prose
    above them is kept), or append the section under its title."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION_BEGIN in old and SECTION_END in old:
        a = old.index(SECTION_BEGIN)
        b = old.index(SECTION_END) + len(SECTION_END)
        new = old[:a] + text.rstrip("\n") + old[b:]
    else:
        new = old.rstrip("\n") + "\n\n" + SECTION_TITLE + "\n\n" + text
    path.write_text(new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default=",".join(map(str, ARCHS)), help="e.g. 80,90,100")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="bf16,fp16,fp32")
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES),
                    help="names from: " + ", ".join(s[0] for s in SHAPES))
    ap.add_argument("--jobs", type=int, default=2, help="compile processes")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    why = cuda_target_problem()
    if why:
        print(f"cannot compile for CUDA here: {why}", file=sys.stderr)
        return 2
    archs = []
    for a in (int(a) for a in args.archs.split(",")):
        why = arch_problem(a)
        if why:
            print(f"skipping sm_{a}: this triton cannot target it ({why})", file=sys.stderr)
        else:
            archs.append(a)
    shapes = [s for s in SHAPES if s[0] in args.shapes.split(",")]
    t0 = time.perf_counter()
    jobs = collect_jobs(shapes, args.dtypes.split(","), archs)
    print(f"{len(jobs)} distinct compiles", file=sys.stderr)

    def progress(n, total, job):
        if n % 10 == 0 or n == total:
            print(f"  {n}/{total} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    results = run_jobs(jobs, args.jobs, progress)
    cmd = "python tools/gpu_compile_report.py " + " ".join(argv if argv is not None
                                                           else sys.argv[1:])
    text = render(jobs, results, archs, cmd.strip(), time.perf_counter() - t0)
    print(text)
    if not args.no_write:
        write_section(pathlib.Path(args.out), text)
        print(f"wrote the section to {args.out}", file=sys.stderr)
    n_fail = sum(bool(misses(j, r)) for j, r in zip(jobs, results))
    return 1 if (args.check and n_fail) else 0


if __name__ == "__main__":
    sys.exit(main())
