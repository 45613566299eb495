"""Every Triton kernel of moe_kernels compiles for sm_80, sm_90 and sm_100 and meets the
targets of issue #18, checked on a machine without a GPU (not marked gpu: needs no device).

One representative launch per kernel and arch: the configs and argument specialisations the
launchers pick for the Mixtral benchmark shape in bf16 (the gathered variants of the GEMMs,
the weighted combine), recorded on meta tensors and compiled with triton.compile for
GPUTarget("cuda", arch, 32); plus the fp32 (ieee, FMA) GEMMs on sm_80, the arch with the
fewest registers to spare. Targets: compiles; zero spill bytes (ptxas -v); shared memory
within the arch's limit; the GEMMs' K loop pipelined (at least two operand buffers in shared
memory); 16-bit dots on tensor cores (HMMA on sm_80, wgmma/HGMMA on sm_90, tcgen05 on sm_100).
The full sweep (all shapes, dtypes, configs) is tools/gpu_compile_report.py.
"""

from __future__ import annotations

import functools

import pytest
import torch
from _gpu_report import load_tool

tool = load_tool()
_why = tool.cuda_target_problem()
if _why:
    pytest.skip(f"this triton build cannot target CUDA here: {_why}", allow_module_level=True)

from moe_kernels._launch import smem_limit  # noqa: E402

# triton 3.9 warns once that its fp-fusion default will change; nothing to act on here
pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")

MIXTRAL = tool.SHAPES[0][1:6]
# kernel -> the call to compile (the most demanding variant where there are several)
REPRESENTATIVE = {
    "_topk_route_kernel": "top-k of the router logits",
    "_histogram_kernel": "per-chunk expert counts",
    "_scatter_kernel": "sorted positions",
    "_grouped_mm_kernel": "h1 = x @ w1",
    "_combine_kernel": "y = sum w o",
    "_combine_bwd_kernel": "do, dweights",
    "_grouped_dw_kernel": "dw1 = x^T dh1",
}


@functools.cache
def _launches(arch: int, dtype: torch.dtype):
    return {(lc.name, lc.what): lc for lc in tool.record_layer(*MIXTRAL, dtype, arch)}


def _compile(kernel: str, arch: int, dtype: torch.dtype, what: str):
    why = tool.arch_problem(arch)
    if why:
        pytest.skip(f"this triton cannot target sm_{arch}: {why}")
    dname = {v: k for k, v in tool.DTYPES.items()}[dtype]
    job = tool.make_job(_launches(arch, dtype)[(kernel, what)], arch, dname)
    job.bench = True  # a benchmark shape: spills count as a miss
    return job, tool.compile_job(job)


def _check(job, res, arch):
    assert res["ok"], res["error"]
    assert res["spill_stores"] == 0 and res["spill_loads"] == 0, res.get("ptxas_log")
    assert res["shared"] <= smem_limit(arch)
    if job.stage_bytes:  # a GEMM: its K loop keeps several operand tiles in flight
        assert res["shared"] // job.stage_bytes >= 2, (res["shared"], job.stage_bytes)
    assert tool.misses(job, res) == []


@pytest.mark.parametrize("arch", tool.ARCHS, ids=[f"sm{a}" for a in tool.ARCHS])
@pytest.mark.parametrize("kernel", list(REPRESENTATIVE))
def test_kernel_compiles_within_targets(kernel, arch):
    job, res = _compile(kernel, arch, torch.bfloat16, REPRESENTATIVE[kernel])
    _check(job, res, arch)
    if job.stage_bytes:
        assert tool.tensor_cores(job, res) == tool.TC_NAME[arch]
        assert res["dots"]["fma"] == 0 and res["dots"]["src"] >= 1


@pytest.mark.parametrize("kernel", ["_grouped_mm_kernel", "_grouped_dw_kernel"])
def test_fp32_gemms_sm80(kernel):
    job, res = _compile(kernel, 80, torch.float32, REPRESENTATIVE[kernel])
    _check(job, res, 80)
    assert tool.tensor_cores(job, res) == "FMA (ieee fp32)"
