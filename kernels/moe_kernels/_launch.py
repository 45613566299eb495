"""Kernel launches as data: configs chosen from shapes, and a recorder that stands in for a GPU.

Every launcher in moe_kernels builds a Launch (kernel, grid, arguments by name, constexprs,
num_warps, num_stages) from its tensors' shapes and hands it to run(). Normally run() launches
it. Inside record_launches() it only records it, and meta tensors (shapes, no storage) count
as device tensors, so the whole launch path - routing, plan, the layer's forward and
backward - can be run on a machine without a GPU:
  - tools/gpu_compile_report.py compiles exactly the kernels, configs and argument
    specialisations the launchers would launch for a shape on a given architecture;
  - the tests check that the launch path never synchronises with the host (a meta tensor
    raises on .item(), .tolist(), .cpu() and bool()).

Configs are pure functions of shapes, dtype and the target architecture (no autotuning: an
autotune pass benchmarks, which synchronises, and its choice cannot be checked offline).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# Opt-in shared memory per block (bytes) by compute capability; 99 KB for the consumer parts
# (sm_86, sm_89, sm_120) and anything unknown.
SMEM_LIMIT = {80: 163 << 10, 87: 163 << 10, 90: 227 << 10, 100: 227 << 10, 103: 227 << 10}
SMEM_DEFAULT = 99 << 10


def smem_limit(arch: int) -> int:
    return SMEM_LIMIT.get(arch, SMEM_DEFAULT)


@dataclass(frozen=True)
class Config:
    """Block sizes (constexprs) plus num_warps and num_stages of one launch."""

    blocks: tuple[tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def of(cls, num_warps: int = 4, num_stages: int = 3, **blocks: int) -> Config:
        return cls(tuple(blocks.items()), num_warps, num_stages)

    def __getitem__(self, name: str) -> int:
        return dict(self.blocks)[name]

    def meta(self) -> dict[str, int]:
        return dict(self.blocks)

    def __str__(self) -> str:
        b = "x".join(str(v) for _, v in self.blocks)
        return f"{b} w{self.num_warps} s{self.num_stages}"


@dataclass
class Launch:
    """One kernel launch: kernel[grid](**args, **constexprs, num_warps=, num_stages=)."""

    kernel: Any  # a triton JITFunction
    grid: tuple[int, ...]
    args: dict[str, Any]  # runtime arguments by name: tensors and ints
    constexprs: dict[str, Any]  # everything tl.constexpr, block sizes included
    num_warps: int = 4
    num_stages: int = 3
    what: str = ""  # which call of the launcher, for reports ("h1 = x @ w1", ...)

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", str(fn))


@dataclass
class _Recorder:
    arch: int
    sms: int
    launches: list = field(default_factory=list)


class _State(threading.local):
    recorder: _Recorder | None = None


_STATE = _State()


def recording() -> bool:
    return _STATE.recorder is not None


@contextlib.contextmanager
def record_launches(arch: int = 90, sms: int = 132) -> Iterator[list[Launch]]:
    """Record launches instead of running them, as if on a GPU of compute capability `arch`
    (90: H100/H200) with `sms` multiprocessors. Pass meta tensors (device="meta")."""
    saved = _STATE.recorder
    _STATE.recorder = _Recorder(arch, sms)
    try:
        yield _STATE.recorder.launches
    finally:
        _STATE.recorder = saved


def layer_on_meta(T: int, D: int, F: int, E: int, K: int, dtype: torch.dtype) -> list:
    """Route, plan, forward and backward of the MoE layer (triton backend) on meta tensors, as a
    caller of `record_launches` traces them; returns the five gradients (x, w1, w3, w2, weights).
    """
    from moe_kernels.moe_mlp import moe_mlp
    from moe_kernels.routing import topk_route

    m = dict(device="meta", dtype=dtype)
    x = torch.empty(T, D, **m, requires_grad=True)
    w1 = torch.empty(E, D, F, **m, requires_grad=True)
    w3 = torch.empty(E, D, F, **m, requires_grad=True)
    w2 = torch.empty(E, F, D, **m, requires_grad=True)
    wts, ids = topk_route(torch.empty(T, E, **m), K, backend="triton")
    wts.requires_grad_()
    y = moe_mlp(x, w1, w3, w2, ids, wts, backend="triton")
    y.backward(torch.empty_like(y))
    return [t.grad for t in (x, w1, w3, w2, wts)]


def run(launch: Launch) -> None:
    rec = _STATE.recorder
    if rec is not None:
        rec.launches.append(launch)
        return
    launch.kernel[launch.grid](**launch.args, **launch.constexprs,
                               num_warps=launch.num_warps, num_stages=launch.num_stages)


@functools.cache
def _cuda_props(index: int) -> tuple[int, int]:
    p = torch.cuda.get_device_properties(index)
    return p.major * 10 + p.minor, p.multi_processor_count


def device_arch(device: torch.device) -> int | None:
    """Compute capability as an int (90 for sm_90) of the device the launch targets; None
    for the interpreter (CPU tensors). A host-side property query, never a synchronisation."""
    if _STATE.recorder is not None:
        return _STATE.recorder.arch
    if device.type == "cuda":
        return _cuda_props(device.index if device.index is not None
                           else torch.cuda.current_device())[0]
    return None


def device_sms(device: torch.device) -> int | None:
    """Multiprocessor count of the target device (None for the interpreter)."""
    if _STATE.recorder is not None:
        return _STATE.recorder.sms
    if device.type == "cuda":
        return _cuda_props(device.index if device.index is not None
                           else torch.cuda.current_device())[1]
    return None
