"""The collect-and-compile half of tools/gpu_compile_report.py (which imports it and reports).

Records the MoE layer's launches on meta tensors (`moe_kernels._launch.record_launches`), turns
each distinct launch into a Job (signature, constexprs, attributes as triton's launcher would
derive them for sm_<arch>), compiles it with `triton.compile(ASTSource(...), target=...)` and
measures the result (registers, spills, shared memory, tensor-core use), then judges it against
the report's targets. No GPU is needed. Shapes follow the legend in moe_kernels/__init__.py.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import pathlib
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ARCHS = (80, 90, 100)
# Multiprocessors of the part each arch is recorded as (A100, H100 SXM, B200): the dW split
# factor depends on it, and with it the dtype of the dW partials.
SMS = {80: 108, 90: 132, 100: 148}
TC_NAME = {80: "HMMA", 90: "HGMMA", 100: "tcgen05"}


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
