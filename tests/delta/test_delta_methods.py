"""Each delta compression step against a hand-computed case; the spec parser's refusals; the
file's reported size against its bytes on disk."""

import math

import pytest
import torch

from moe.config import ConfigError
from moe.delta.format import Delta, compress_tensors, decode, to_bytes, write_delta
from moe.delta.registry import parse_spec

D = torch.tensor([[0.5, -2.0, 0.25], [1.0, 0.0, -0.75]], dtype=torch.float64)  # (2, 3)


def roundtrip(deltas, spec, seed=0):
    stored, descs = compress_tensors(deltas, spec, seed=seed)
    return {n: decode(n, descs[n], stored) for n in deltas}, stored, descs


def test_none_is_float32_dense():
    got, stored, descs = roundtrip({"w": D}, "none")
    assert descs["w"]["layout"] == "dense" and stored["w:v.f32"].dtype == torch.float32
    assert torch.equal(got["w"], D)  # these values are exact in float32


def test_topk_keeps_largest_magnitudes():
    got, stored, descs = roundtrip({"w": D}, "topk:0.5")  # ceil(0.5 * 6) = 3 kept
    want = torch.tensor([[0.0, -2.0, 0.0], [1.0, 0.0, -0.75]], dtype=torch.float64)
    assert torch.equal(got["w"], want)
    assert descs["w"]["k"] == 3
    # 3 int16 positions (6 bytes) cost more than a 1-byte bitmask over 6 entries
    assert "w:mask" in stored and stored["w:mask"].tolist() == [0b101010]  # positions 1, 3, 5


def test_topk_positions_when_cheaper_than_mask():
    x = torch.zeros(1000, dtype=torch.float64)
    x[[3, 500, 999]] = torch.tensor([1.0, -3.0, 2.0], dtype=torch.float64)
    got, stored, _ = roundtrip({"x": x}, "topk:0.003")
    assert stored["x:idx"].dtype == torch.int16 and stored["x:idx"].tolist() == [3, 500, 999]
    assert torch.equal(got["x"], x)


def test_dare_drops_and_rescales_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    got, _, _ = roundtrip({"x": x}, "dare:0.5", seed=7)
    # the mask the step draws: the generator seeded for (seed 7, tensor "x")
    from moe.delta.primitives import tensor_generator

    keep = torch.rand(4, generator=tensor_generator(7, "x"), dtype=torch.float64) < 0.5
    assert torch.equal(got["x"], torch.where(keep, x * 2.0, torch.zeros_like(x)))


def test_dare_rescale_keeps_the_expected_value():
    x = torch.linspace(-1, 1, 200, dtype=torch.float64)
    density, n = 0.3, 2000
    mean = torch.zeros_like(x)
    for s in range(n):
        mean += roundtrip({"x": x}, f"dare:{density}", seed=s)[0]["x"]
    mean /= n
    # per entry, the mean of n draws has sd |x| sqrt((1-p)/p / n); allow 5 sd
    sd = x.abs() * math.sqrt((1 - density) / density / n)
    assert bool(((mean - x).abs() <= 5 * sd + 1e-12).all())
    assert abs(float(mean.sum() - x.sum())) < 5 * float(sd.pow(2).sum().sqrt())


def test_bitdelta_sign_times_mean_abs():
    got, stored, _ = roundtrip({"w": D}, "bitdelta")
    a = (0.5 + 2.0 + 0.25 + 1.0 + 0.0 + 0.75) / 6
    want = torch.tensor([[a, -a, a], [a, a, -a]], dtype=torch.float64)
    torch.testing.assert_close(got["w"], want, rtol=1e-7, atol=0)  # α stored as float32
    assert stored["w:v.sign"].tolist() == [0b100010]  # negatives at flat positions 1 and 5


def test_topk_then_bitdelta_scales_kept_only():
    got, _, _ = roundtrip({"w": D}, "topk:0.5+bitdelta")
    a = (2.0 + 1.0 + 0.75) / 3
    want = torch.tensor([[0.0, -a, 0.0], [a, 0.0, -a]], dtype=torch.float64)
    torch.testing.assert_close(got["w"], want, rtol=1e-7, atol=0)


def test_lowrank_truncates_singular_values():
    U = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(0)))[0]
    V = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(1)))[0]
    S = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    W = U[:, :4] @ torch.diag(S) @ V.T  # (5, 4) with known singular values
    got, stored, descs = roundtrip({"w": W, "g": torch.ones(3, dtype=torch.float64)}, "lowrank:2")
    want = U[:, :2] @ torch.diag(S[:2]) @ V[:, :2].T
    torch.testing.assert_close(got["w"], want, rtol=0, atol=1e-6)
    assert stored["w:A.f32"].shape == (10,) and stored["w:B.f32"].shape == (8,)
    assert descs["w"]["rank"] == 2 and descs["g"]["layout"] == "dense"  # 1-D: no rank


def test_int8_by_hand():
    x = torch.tensor([1.27, -0.5, 0.01, 0.0], dtype=torch.float64)
    got, stored, _ = roundtrip({"x": x}, "int8")
    assert stored["x:v.q"].tolist() == [127, -50, 1, 0]
    torch.testing.assert_close(stored["x:v.scale"], torch.tensor([0.01]))
    torch.testing.assert_close(got["x"], torch.tensor([1.27, -0.5, 0.01, 0.0],
                                                      dtype=torch.float64), rtol=1e-6, atol=0)


def test_int4_by_hand():
    x = torch.tensor([0.7, -0.36, 0.1], dtype=torch.float64)  # s = 0.1; q = 7, -3.6->-4, 1
    got, stored, _ = roundtrip({"x": x}, "int4")
    # nibbles offset by 8: 15, 4, 9 (+ pad 8): bytes 15 | 4<<4 = 79, 9 | 8<<4 = 137
    assert stored["x:v.q4"].tolist() == [79, 137]
    torch.testing.assert_close(got["x"], torch.tensor([0.7, -0.4, 0.1], dtype=torch.float64),
                               rtol=1e-6, atol=1e-7)


def test_fp16():
    got, stored, _ = roundtrip({"w": D}, "fp16")
    assert stored["w:v.f16"].dtype == torch.float16 and torch.equal(got["w"], D)


def test_lowrank_int8_combines():
    W = torch.outer(torch.tensor([1.0, 2.0], dtype=torch.float64),
                    torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64))  # rank 1
    got, stored, _ = roundtrip({"w": W}, "lowrank:1+int8")
    assert stored["w:A.q"].dtype == torch.int8 and stored["w:B.q"].dtype == torch.int8
    torch.testing.assert_close(got["w"], W, rtol=0, atol=0.05)


@pytest.mark.parametrize("spec", ["none", "topk:0.1", "dare:0.2+int8", "bitdelta", "lowrank:2",
                                  "topk:0.3+int4", "lowrank:3+fp16"])
def test_reported_bytes_equal_file_bytes(spec, tmp_path):
    g = torch.Generator().manual_seed(0)
    deltas = {"a.weight": torch.randn(16, 8, generator=g, dtype=torch.float64),
              "b.weight": torch.randn(8, generator=g, dtype=torch.float64)}
    stored, descs = compress_tensors(deltas, spec)
    d = Delta({"method": spec, "tensors": descs, "base": {"id": "x", "sha256": "0"},
               "finetune": {}}, stored)  # fmt: skip
    n = write_delta(tmp_path / "d.delta.safetensors", d)
    assert n == len(to_bytes(d)) == (tmp_path / "d.delta.safetensors").stat().st_size


@pytest.mark.parametrize("spec,msg", [
    ("topk:0", "density must be in (0, 1]"), ("topk:1.5", "density must be in (0, 1]"),
    ("dare:-0.1", "density must be in (0, 1]"), ("lowrank:0", "rank must be >= 1"),
    ("topk", "needs an argument"), ("zip", "unknown step"), ("int8+topk:0.1", "comes before"),
    ("topk:0.1+dare:0.5", "one structure step"), ("int8+int4", "one values step"),
    ("lowrank:2+bitdelta", "does not combine"), ("lowrank:x", "not a whole number"),
])  # fmt: skip
def test_bad_specs(spec, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")):
        parse_spec(spec)


def test_rank_larger_than_tensor():
    with pytest.raises(ConfigError, match="rank 5 is larger than tensor w"):
        compress_tensors({"w": torch.zeros(4, 6, dtype=torch.float64)}, "lowrank:5")
