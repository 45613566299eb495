"""moe/delta/primitives.py, the arithmetic delta compression, merging and the surgery's simulated
quantization share, against hand-computed cases; and each side's use of it."""

import math

import pytest
import torch

from moe.delta.primitives import (
    absmax_scale,
    dare_keep_mask,
    dequantize,
    keep_count,
    quantize_symmetric,
    tensor_generator,
    topk_keep,
)

NAN = math.nan


def test_dare_keep_mask_is_the_generators_uniforms_below_density():
    # the mask is exactly torch.rand's draws, in the dtype asked for, compared with the density
    u32 = torch.rand(2, 3, generator=torch.Generator().manual_seed(1))
    got = dare_keep_mask((2, 3), 0.4, torch.Generator().manual_seed(1))
    assert got.dtype == torch.bool and torch.equal(got, u32 < 0.4)
    u64 = torch.rand(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = dare_keep_mask((6,), 0.4, torch.Generator().manual_seed(1), torch.float64)
    assert torch.equal(got, u64 < 0.4)
    # density 1 keeps everything (uniforms lie in [0, 1)), density 0 nothing
    assert dare_keep_mask((50,), 1.0, tensor_generator(0, "w")).all()
    assert not dare_keep_mask((50,), 0.0, tensor_generator(0, "w")).any()


def test_merge_and_delta_dare_draw_as_before():
    from moe.delta.dare import dare
    from moe.merge.dare import drop_and_rescale

    x = torch.tensor([[1.0, -2.0, 3.0], [4.0, -5.0, 6.0]])
    # merge: float32 uniforms over the tensor's shape; survivors / density
    u = torch.rand(2, 3, generator=tensor_generator(3, "w", 1))
    want = torch.where(u < 0.5, x / 0.5, torch.zeros_like(x))
    assert torch.equal(drop_and_rescale(x, 0.5, tensor_generator(3, "w", 1)), want)
    assert torch.equal(drop_and_rescale(x, 1.0, None), x)  # density 1: no draw at all
    # delta: float64 uniforms over the flat tensor; positions of the survivors
    u = torch.rand(6, generator=tensor_generator(3, "w"), dtype=torch.float64)
    c = dare(x, 0.5, tensor_generator(3, "w"))
    idx = torch.nonzero(u < 0.5).flatten()
    assert torch.equal(c.idx, idx) and torch.equal(c.arrays["v"], x.reshape(-1)[idx] / 0.5)


def test_keep_count():
    assert keep_count(6, 0.5) == 3
    assert keep_count(10, 0.01) == 1  # ceil(0.1), and never fewer than one
    assert keep_count(10, 0.25) == 3  # ceil(2.5)
    assert keep_count(4, 1.0) == 4 and keep_count(4, 2.0) == 4


def test_topk_keep_by_hand():
    mag = torch.tensor([0.5, 2.0, 0.25, 1.0, 0.0, 0.75])
    # the three largest: 2.0 (1), 1.0 (3), 0.75 (5)
    assert topk_keep(mag, 3).tolist() == [False, True, False, True, False, True]
    assert topk_keep(mag, 6).all() and topk_keep(mag, 9).all()
    assert not topk_keep(mag, 0).any()
    # ties at the threshold go to the lower positions
    tied = torch.tensor([1.0, 3.0, 1.0, 1.0, 2.0, 1.0])
    assert topk_keep(tied, 3).tolist() == [True, True, False, False, True, False]
    assert topk_keep(tied, 4).tolist() == [True, True, True, False, True, False]
    # all equal: the first k
    assert topk_keep(torch.ones(5), 2).tolist() == [True, True, False, False, False]
    assert topk_keep(torch.zeros(0), 1).shape == (0,)


def test_topk_keep_matches_a_stable_sort():
    g = torch.Generator().manual_seed(0)
    for n, k in [(1, 1), (7, 3), (100, 1), (100, 37), (257, 256)]:
        mag = torch.randint(0, 5, (n,), generator=g).float()  # many ties
        order = torch.argsort(mag, descending=True, stable=True)
        want = torch.zeros(n, dtype=torch.bool)
        want[order[:k]] = True
        assert torch.equal(topk_keep(mag, k), want)


def test_topk_keep_nan():
    mag = torch.tensor([1.0, NAN, 3.0, 2.0, NAN, 0.5])
    # keep_nan: NaN ranks first (as a stable sort ranks it), then the largest numbers
    assert topk_keep(mag, 1).tolist() == [False, True, False, False, False, False]
    assert topk_keep(mag, 3).tolist() == [False, True, True, False, True, False]
    # the trim's way: NaN takes its place among the k largest but is never kept
    assert not topk_keep(mag, 2, keep_nan=False).any()
    assert topk_keep(mag, 3, keep_nan=False).tolist() == [False, False, True, False, False,
                                                           False]  # fmt: skip
    # ... and entries equal to the k-th largest may fill the NaN's place
    tied = torch.tensor([NAN, 2.0, 2.0, 2.0, 1.0])
    assert topk_keep(tied, 2, keep_nan=False).tolist() == [False, True, True, False, False]
    assert topk_keep(tied, 2).tolist() == [True, True, False, False, False]


def test_trim_and_topk_select_the_same_entries():
    from moe.delta.topk import topk
    from moe.merge.ties import trim

    g = torch.Generator().manual_seed(1)
    x = torch.randint(-4, 5, (8, 9), generator=g).float()  # ties in |x| everywhere
    for density in (0.1, 0.3, 0.5, 0.9):
        c = topk(x, density)
        k = c.idx.numel()
        assert k == math.ceil(density * x.numel())
        # the trim at the density that floors to the same k keeps the same positions
        kept = trim(x, (k + 0.5) / x.numel()).reshape(-1) != 0  # floor: k
        assert torch.equal(torch.nonzero(kept).flatten(), c.idx[x.reshape(-1)[c.idx] != 0])


def test_absmax_scale_by_hand():
    x = torch.tensor([[0.5, -2.54, 1.0], [0.0, 0.0, 0.0]])
    s = absmax_scale(x, 127)  # one scale for everything: 2.54 / 127 = 0.02
    assert s.shape == () and s.dtype == torch.float32
    assert s == torch.tensor(2.54, dtype=torch.float32) / 127
    rows = absmax_scale(x.double(), 7, -1, torch.float16)  # per row, rounded to fp16
    assert rows.shape == (2, 1) and rows.dtype == torch.float16
    assert rows[0, 0] == torch.tensor(2.54 / 7, dtype=torch.float64).half() and rows[1, 0] == 0
    assert absmax_scale(torch.zeros(0), 127) == 0  # an empty array


def test_quantize_dequantize_by_hand():
    x = torch.tensor([0.1, -0.25, 0.5, 1.0, -3.0])
    s = torch.tensor([0.25])
    # x / s = 0.4, -1, 2, 4, -12 -> round (half to even) 0, -1, 2, 4, -12 -> clamp to ±7
    q = quantize_symmetric(x, s, 7)
    assert q.dtype == torch.float64 and q.tolist() == [0.0, -1.0, 2.0, 4.0, -7.0]
    assert dequantize(q, s).tolist() == [0.0, -0.25, 0.5, 1.0, -1.75]
    # round half to even: 0.5 -> 0, 1.5 -> 2, -2.5 -> -2
    assert quantize_symmetric(torch.tensor([0.5, 1.5, -2.5]), torch.tensor(1.0), 127).tolist() == [
        0.0, 2.0, -2.0]  # fmt: skip
    # a zero scale (an all-zero group) divides by one; the dequantized values stay 0
    z = torch.zeros(3)
    assert quantize_symmetric(z, torch.tensor(0.0), 7).tolist() == [0.0, 0.0, 0.0]
    assert dequantize(quantize_symmetric(z, torch.tensor(0.0), 7), torch.tensor(0.0)).eq(0).all()


@pytest.mark.parametrize("bits,qmax", [(8, 127), (4, 7)])
def test_delta_and_surgery_quantizers_agree_on_one_group(bits, qmax):
    """A delta's array and a surgery group of the same values differ only in the scale's
    storage (float32 vs float16)."""
    from moe.delta import quant
    from moe.surgery.quantize import quantize_dequantize

    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(2))
    c = getattr(quant, f"int{bits}")(x.reshape(-1))
    dec = (quant._dequant if bits == 8 else quant._unpack4)(c, 16)
    s32 = x.abs().max() / qmax
    assert torch.equal(c["scale"], s32.reshape(1))
    assert torch.equal(dec, (torch.round(x.double() / s32.double()).clamp(-qmax, qmax)
                             * s32.double()).reshape(-1))  # fmt: skip
    s16 = (x.double().abs().max() / qmax).half().double()  # the surgery's fp16 scale
    want = (torch.round(x.double() / s16).clamp(-qmax, qmax) * s16).float()
    assert torch.equal(quantize_dequantize(x, bits, 16), want)
