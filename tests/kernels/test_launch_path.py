"""The triton launch path, checked without a device.

- Configs (tiles, warps, stages, the dW split) are pure functions of shapes, dtype and the
  target architecture: no device query, no data, no autotuning; known values at the
  benchmark shapes; every entry of the tile tables is reached by the shapes that
  tools/gpu_compile_report.py compiles, and fits the shared memory of the listed archs.
- The routing path's launch sequence (top-k, plan, the layer's forward and backward) never
  synchronises with the host: it is run on meta tensors (shapes, no storage; .item(),
  .tolist(), .cpu() and bool() raise on them) with launches recorded instead of run, under a
  dispatch mode that also fails on any op that would synchronise on a GPU.
"""

from __future__ import annotations

import importlib

import moe_kernels as mk
import pytest
import torch
from _gpu_report import load_tool
from moe_kernels import _launch, routing
from moe_kernels import grouped_gemm as gg
from moe_kernels._launch import Config, record_launches, smem_limit
from torch.utils._python_dispatch import TorchDispatchMode

# the module (moe_kernels exports a function of the same name)
mm = importlib.import_module("moe_kernels.moe_mlp")

if not mk.HAS_TRITON:
    pytest.skip("needs triton (the kernels are defined only where it imports)",
                allow_module_level=True)

MIXTRAL = (16384, 4096, 14336, 8, 2)  # T, D, F, E, K (tools/bench_kernels.py GPU_SHAPES)
OLMOE = (16384, 2048, 1024, 64, 8)
BF16 = torch.bfloat16


@pytest.fixture
def no_cuda(monkeypatch):
    """Any CUDA query fails: a config choice must not need one."""
    def boom(*a, **k):
        raise AssertionError("config choice queried the CUDA runtime")

    for name in ("get_device_properties", "get_device_capability", "current_device",
                 "synchronize", "is_available", "device_count"):
        monkeypatch.setattr(torch.cuda, name, boom)


# --------------------------------------------------------------------------- configs


def _mm(rows_per_expert, D, F, E, dtype=BF16, arch=90):
    return gg.grouped_mm_config(rows_per_expert * E, D, F, E, dtype, arch)


def test_grouped_mm_config_at_benchmark_shapes(no_cuda):
    T, D, F, E, K = MIXTRAL
    for arch in (80, 90, 100):
        for N, d, f in [(T * K, D, F), (T * K, F, D)]:  # h1/h3 (and da), o (and dx)
            assert gg.grouped_mm_config(N, d, f, E, BF16, arch) == Config.of(
                num_warps=8, num_stages=4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
    T, D, F, E, K = OLMOE  # 2048 rows per expert: the large tile too
    assert gg.grouped_mm_config(T * K, D, F, E, torch.float16, 90)["BLOCK_M"] == 128


def test_grouped_mm_config_classes(no_cuda):
    tiles = gg.MM_TILES
    assert _mm(16, 64, 256, 8) == Config.of(num_warps=4, num_stages=4,
                                            BLOCK_M=64, BLOCK_N=128, BLOCK_K=64)
    assert str(_mm(16, 256, 64, 8)) == "64x64x64 w4 s4"      # few rows, narrow output
    assert str(_mm(1024, 256, 64, 8)) == "128x64x64 w4 s4"   # many rows, narrow output
    assert str(_mm(1024, 256, 256, 8, torch.float32)) == "64x64x16 w8 s3"  # ieee fp32: FMA
    # D or F not a multiple of 16: scalar loads, a tile that does not spill with them
    assert str(_mm(1024, 200, 256, 8)) == "64x64x32 w4 s3"
    assert str(_mm(1024, 256, 300, 8)) == "64x64x32 w4 s3"
    assert str(gg.grouped_dw_config(8192, 200, 256, 8, BF16, 90)) == "64x64x64 w4 s3"
    assert gg.grouped_mm_config(10, 40, 24, 5, torch.float32, None) == gg.INTERP_MM
    # No tensor-core tile is shorter than 64 rows: wgmma needs 64 per warpgroup.
    assert all(t[0] >= 64 for (cls, _), t in tiles.items() if cls == "tc")


def test_stages_fit_shared_memory(no_cuda):
    # sm_89 / sm_120 have 99 KB per block: 4 stages of a 128x128x64 bf16 tile (128 KB)
    # are cut to 3; the listed archs keep 4.
    assert _mm(1024, 4096, 4096, 8, arch=89).num_stages == 3
    assert _mm(1024, 4096, 4096, 8, arch=120).num_stages == 3
    for arch in (80, 90, 100):
        assert _mm(1024, 4096, 4096, 8, arch=arch).num_stages == 4
    for arch in (80, 86, 89, 90, 100, 120):
        for dtype in (BF16, torch.float16, torch.float32):
            for rows, D, F in [(16, 64, 256), (16, 256, 64), (1024, 256, 64), (1024, 512, 512)]:
                c = _mm(rows, D, F, 8, dtype, arch)
                stage = (c["BLOCK_M"] * c["BLOCK_K"] + c["BLOCK_K"] * c["BLOCK_N"])
                assert c.num_stages * stage * dtype.itemsize <= smem_limit(arch)
                c = gg.grouped_dw_config(rows * 8, D, F, 8, dtype, arch)
                stage = (c["BLOCK_D"] * c["BLOCK_M"] + c["BLOCK_M"] * c["BLOCK_F"])
                assert c.num_stages * stage * dtype.itemsize <= smem_limit(arch)


def test_dw_config_and_split(no_cuda):
    T, D, F, E, K = MIXTRAL
    c = gg.grouped_dw_config(T * K, D, F, E, BF16, 90)
    assert str(c) == "64x128x128 w8 s4"
    # Mixtral: 32 x 112 tiles per expert already fill 132 SMs twice over; OLMoE's 16 x 8
    # do not, so its rows are split 3 ways (fp32 partials, summed in order).
    assert gg.dw_split(E, D, F, 132) == 1
    assert gg.dw_split(64, 2048, 1024, 132) == 3
    assert gg.dw_split(8, 64, 256, 132, 64, 64) == 8  # capped at 8
    assert gg.dw_split(8, 64, 256, None) == 2  # interpreter: exercise the split path


def test_routing_and_combine_configs(no_cuda):
    assert routing.topk_route_config(16384, 8, 2).meta() == dict(BLOCK_T=64, BLOCK_E=16,
                                                                BLOCK_K=2)
    assert routing.topk_route_config(16384, 64, 8).meta() == dict(BLOCK_T=64, BLOCK_E=64,
                                                                 BLOCK_K=8)
    for E in (1, 8, 64, 256):
        c = routing.plan_config(E)
        assert c["BLOCK"] * c["E_PAD"] <= 4096 or c["BLOCK"] == 16
    assert mm.combine_config(4096)["BLOCK_D"] == 1024
    assert mm.combine_config(40)["BLOCK_D"] == 64


def test_configs_are_deterministic(no_cuda):
    calls = [
        lambda: gg.grouped_mm_config(32768, 4096, 14336, 8, BF16, 90),
        lambda: gg.grouped_dw_config(131072, 2048, 1024, 64, torch.float16, 80),
        lambda: routing.plan_config(64),
        lambda: routing.topk_route_config(7, 13, 3),
        lambda: mm.combine_config(2048),
    ]
    for f in calls:
        assert f() == f()


def test_report_shapes_reach_every_table_entry(no_cuda):
    """tools/gpu_compile_report.py compiles every config the launchers can choose: its
    shapes reach every tile-table entry (and no config outside the tables) on each arch."""
    tool = load_tool()
    want_mm = {(cls, t) for (cls, _), t in gg.MM_TILES.items()}
    want_dw = {(cls, t) for (cls, _), t in gg.DW_TILES.items()}
    for arch in tool.ARCHS:
        got_mm, got_dw = set(), set()
        for dname, dtype in tool.DTYPES.items():
            cls = "tc" if dname != "fp32" else "fma"
            for _, T, D, F, E, K, _ in tool.SHAPES:
                for lc in tool.record_layer(T, D, F, E, K, dtype, arch):
                    c = lc.constexprs
                    key = (lc.num_warps, lc.num_stages)
                    if lc.name == "_grouped_mm_kernel":
                        got_mm.add((cls, (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) + key))
                    elif lc.name == "_grouped_dw_kernel":
                        got_dw.add((cls, (c["BLOCK_M"], c["BLOCK_D"], c["BLOCK_F"]) + key))
        assert got_mm == want_mm, arch
        assert got_dw == want_dw, arch


# --------------------------------------------------------------------------- no host sync

# Ops that copy a device value to the host (a synchronisation on CUDA), or whose output
# size depends on the data (which needs one).
_SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal",
             "aten.nonzero", "aten.masked_select", "aten._unique2", "aten.unique_dim",
             "aten.unique_consecutive", "aten.bincount", "aten.repeat_interleave",
             "aten.allclose", "aten.tolist"}


class _FailOnSync(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        self.ops.append(name)
        to_host = (
            (name == "aten._to_copy" and str(kwargs.get("device", "")) == "cpu")
            or (name == "aten.copy_" and args[0].device.type == "cpu"
                and args[1].device.type != "cpu")
        )
        if name in _SYNC_OPS or to_host:
            raise AssertionError(f"host synchronisation in the launch path: {func}")
        return func(*args, **kwargs)


def _layer_on_meta(T, D, F, E, K, dtype=BF16, arch=90):
    with record_launches(arch, 132) as launches, _FailOnSync() as mode:
        grads = _launch.layer_on_meta(T, D, F, E, K, dtype)
    return launches, mode.ops, grads


LAYER_SEQUENCE = [
    ("_topk_route_kernel", "top-k of the router logits"),
    ("_histogram_kernel", "per-chunk expert counts"),
    ("_scatter_kernel", "sorted positions"),
    ("_grouped_mm_kernel", "h1 = x @ w1"),
    ("_grouped_mm_kernel", "h3 = x @ w3"),
    ("_grouped_mm_kernel", "o = a @ w2"),
    ("_combine_kernel", "y = sum w o"),
    ("_combine_bwd_kernel", "do, dweights"),
    ("_grouped_dw_kernel", "dw2 = a^T do"),
    ("_grouped_mm_kernel", "da = do @ w2^T"),
    ("_grouped_dw_kernel", "dw1 = x^T dh1"),
    ("_grouped_dw_kernel", "dw3 = x^T dh3"),
    ("_grouped_mm_kernel", "dx = dh1 @ w1^T"),
    ("_grouped_mm_kernel", "dx += dh3 @ w3^T"),
    ("_combine_kernel", "dx = sum dxs"),
]


@pytest.mark.parametrize("shape", [MIXTRAL, OLMOE, (1, 64, 96, 4, 4)],
                         ids=["mixtral", "olmoe", "T1"])
def test_routing_launch_path_never_syncs(shape):
    launches, ops, grads = _layer_on_meta(*shape)
    assert [(lc.name, lc.what) for lc in launches] == LAYER_SEQUENCE
    assert "aten.silu_backward" in ops  # the mode saw the backward too
    T, D, F, E, K = shape
    assert [tuple(g.shape) for g in grads] == [(T, D), (E, D, F), (E, D, F), (E, F, D), (T, K)]


def test_launches_depend_on_shapes_only():
    """Recorded twice from tensors without data: the same kernels, grids and configs."""
    def key(launches):
        return [(lc.name, lc.grid, sorted(lc.constexprs.items()), lc.num_warps,
                 lc.num_stages) for lc in launches]

    a, _, _ = _layer_on_meta(*OLMOE)
    b, _, _ = _layer_on_meta(*OLMOE)
    assert key(a) == key(b)
    h1 = a[3]
    T, D, F, E, K = OLMOE
    # grid: an upper bound on row tiles (one partial tile per expert) x column tiles
    assert h1.grid == (T * K // 128 + E, F // 128)


def test_sync_is_caught():
    """The checks above would see a synchronisation: meta tensors raise on every way to
    read a value, and the dispatch mode names the op."""
    t = torch.empty(4, device="meta")
    for read in (lambda: t.sum().item(), t.tolist, t.cpu, lambda: bool(t.sum()),
                 lambda: int(t.sum())):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()
    c = torch.zeros(3)
    with _FailOnSync(), pytest.raises(AssertionError, match="host synchronisation"):
        c.sum().item()
    with _FailOnSync(), pytest.raises(AssertionError, match="host synchronisation"):
        torch.nonzero(c)


def test_recording_needs_meta_tensors():
    """Outside record_launches a meta tensor is not a triton device; inside, CPU tensors
    still are not (unless the interpreter is on)."""
    m = torch.empty(4, 8, device="meta")
    assert not _launch.recording()
    with pytest.raises(ValueError, match="backend 'triton' needs CUDA"):
        mk.topk_route(m, 2, backend="triton")
    with record_launches(90) as launches:
        mk.topk_route(m, 2, backend="triton")
        if not mk.INTERPRET:
            with pytest.raises(ValueError, match="backend 'triton' needs CUDA"):
                mk.topk_route(torch.zeros(4, 8), 2, backend="triton")
    assert [lc.name for lc in launches] == ["_topk_route_kernel"]
