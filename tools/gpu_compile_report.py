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

Launches are collected and compiled by gpu_compile_jobs.py (beside this file); this file
renders the report and holds the command line.

Shapes follow the legend in moe_kernels/__init__.py: T tokens, D model dim, F expert hidden
dim, E experts, K experts per token.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")

import torch  # noqa: E402

# The kernel collection and compiles live in gpu_compile_jobs.py; its names stay importable
# from here (tests/kernels/_gpu_report.py loads this file as the tool).
from gpu_compile_jobs import (  # noqa: E402
    ARCHS,
    DTYPES,
    PTXAS_MIN,
    SHAPES,
    SMS,
    TC_NAME,
    Job,
    arch_problem,
    collect_jobs,
    compile_job,
    config_str,
    cuda_target_problem,
    make_job,
    misses,
    record_layer,
    registers,
    run_jobs,
    tensor_cores,
    variant,
)

__all__ = [
    "ARCHS", "DTYPES", "KERNEL_ORDER", "PTXAS_MIN", "SHAPES", "SMS", "TC_NAME", "Job",
    "arch_problem", "collect_jobs", "compile_job", "config_str", "cuda_target_problem",
    "main", "make_job", "misses", "record_layer", "registers", "render", "run_jobs", "summary",
    "tensor_cores", "variant", "write_section",
]

SECTION_BEGIN = "<!-- gpu-compile-report:begin -->"
SECTION_END = "<!-- gpu-compile-report:end -->"


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
