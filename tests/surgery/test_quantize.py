"""Unstructured magnitude pruning and simulated int8/int4 quantization, with their byte counts."""

from __future__ import annotations

import pytest
import torch
from generate_fixtures import tiny_config

from moe.config import ConfigError
from moe.model.transformer import Transformer
from moe.surgery.quantize import (
    compress_state,
    magnitude_prune,
    quantize_dequantize,
    tensor_bytes,
)


def _reference(t: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Slow reference: one group at a time along the last axis (the last group may be short)."""
    qmax = 2 ** (bits - 1) - 1
    out = torch.empty_like(t, dtype=torch.float64)
    rows = t.double().reshape(-1, t.shape[-1])
    o = out.view(-1, t.shape[-1])
    for i, row in enumerate(rows):
        for a in range(0, row.numel(), group):
            g = row[a:a + group]
            s = float(torch.tensor(float(g.abs().max()) / qmax).half())
            o[i, a:a + group] = 0.0 if s == 0 else torch.clamp(torch.round(g / s), -qmax, qmax) * s
    return out.to(t.dtype)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(5, 64), (3, 7, 50), (1, 1)])
def test_quantize_matches_reference_and_error_bound(bits, shape):
    torch.manual_seed(0)
    t = torch.randn(shape) * torch.linspace(0.1, 3, shape[-1])
    got = quantize_dequantize(t, bits, 32)
    torch.testing.assert_close(got, _reference(t, bits, 32), rtol=0, atol=1e-6)
    qmax = 2 ** (bits - 1) - 1
    rows = t.reshape(-1, shape[-1])
    for a in range(0, shape[-1], 32):
        s = rows[:, a:a + 32].abs().amax(-1, keepdim=True) / qmax
        err = (got.reshape(-1, shape[-1])[:, a:a + 32] - rows[:, a:a + 32]).abs()
        assert (err <= 0.6 * s + 1e-7).all()  # half a step, plus the fp16 scale's rounding
    # the values really take at most 2^bits - 1 levels per group
    g = got.reshape(-1, shape[-1])[:, :32]
    assert all(len(set(r.tolist())) <= 2 * qmax + 1 for r in g)


def test_magnitude_prune_zeroes_the_smallest():
    t = torch.tensor([[0.5, -3.0, 0.1], [2.0, -0.2, 1.0]])
    got = magnitude_prune(t, 0.5)
    assert got.tolist() == [[0.0, -3.0, 0.0], [2.0, 0.0, 1.0]]
    assert torch.equal(magnitude_prune(t, 0.0), t)


def test_bytes_by_hand():
    t = torch.ones(4, 64)
    assert tensor_bytes(t, 16, 32, sparse=False) == 4 * 64 * 2
    assert tensor_bytes(t, 4, 32, sparse=False) == 4 * 64 / 2 + 4 * 2 * 2  # values + 8 scales
    assert tensor_bytes(t, 8, 32, sparse=False) == 4 * 64 + 4 * 2 * 2
    t[:, :32] = 0
    # half the values, a bitmap of 256 bits, and every group's scale
    assert tensor_bytes(t, 8, 32, sparse=True) == 128 + 32 + 16


def test_compress_state_whole_model():
    torch.manual_seed(0)
    m = Transformer(tiny_config(vocab_size=61))
    sd = m.state_dict()
    n = sum(t.numel() for t in sd.values())
    same, info = compress_state(m.config, sd)
    assert info["bytes"] == info["bytes_fp16"] == 2 * n
    assert all(torch.equal(same[k], sd[k]) for k in sd)
    q, info = compress_state(m.config, sd, unstructured=0.5, bits=4)
    assert info["bytes"] < 0.3 * info["bytes_fp16"]
    for k, t in q.items():
        if k.endswith("norm.weight"):
            assert torch.equal(t, sd[k])  # norm gains are not compressed
        else:
            assert float((t == 0).float().mean()) >= 0.5
    with pytest.raises(ConfigError):
        compress_state(m.config, sd, bits=3)
    with pytest.raises(ConfigError):
        compress_state(m.config, sd, unstructured=1.0)
