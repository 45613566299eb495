"""Chunked linear cross-entropy equals the plain loss, in value and in every gradient."""

import pytest
import torch
import torch.nn.functional as F

from moe.model.loss import IGNORE_INDEX, linear_cross_entropy


def _case(dtype=torch.float64, V=101, C=24, shape=(3, 37)):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(*shape, C, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(V, C, dtype=dtype, generator=g, requires_grad=True)
    t = torch.randint(0, V, shape, generator=g)
    t[0, :5] = IGNORE_INDEX
    t[-1, -1] = IGNORE_INDEX
    return h, w, t


@pytest.mark.parametrize("chunk", [1, 16, 37, 1000])
def test_value_per_token_and_gradients_match_plain_cross_entropy(chunk):
    h, w, t = _case()
    ref_BT = F.cross_entropy(F.linear(h, w).transpose(1, 2), t, ignore_index=IGNORE_INDEX,
                             reduction="none")
    gh, gw = torch.autograd.grad(ref_BT.sum() * 0.37, (h, w))
    total, per_BT = linear_cross_entropy(h, w, t, chunk=chunk)
    assert per_BT.shape == t.shape and not per_BT.requires_grad
    torch.testing.assert_close(per_BT, ref_BT.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(total, ref_BT.sum().detach(), rtol=1e-12, atol=1e-12)
    gh2, gw2 = torch.autograd.grad(total * 0.37, (h, w))
    torch.testing.assert_close(gh2, gh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw2, gw, rtol=1e-10, atol=1e-12)


def test_fp32_mean_loss_and_frozen_weight():
    h, w, t = _case(torch.float32, V=300, shape=(2, 50))
    w.requires_grad_(False)
    n = (t != IGNORE_INDEX).sum()
    ref = F.cross_entropy(F.linear(h, w).view(-1, 300), t.view(-1), ignore_index=IGNORE_INDEX)
    (gh,) = torch.autograd.grad(ref, (h,))
    total, _ = linear_cross_entropy(h, w, t, chunk=7)
    (gh2,) = torch.autograd.grad(total / n, (h,))
    torch.testing.assert_close(total / n, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh2, gh, rtol=1e-4, atol=1e-7)


def test_bf16_autocast_close_to_plain_and_no_grad_needs_no_backward():
    h, w, t = _case(torch.float32, V=300, shape=(2, 50))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float().view(-1, 300), t.view(-1),
                              ignore_index=IGNORE_INDEX, reduction="sum")
        total, _ = linear_cross_entropy(h, w, t, chunk=16)
    torch.testing.assert_close(total, ref, rtol=2e-2, atol=0)
    gh, gw = torch.autograd.grad(total, (h, w))
    assert gh.dtype == h.dtype and gw.dtype == w.dtype and torch.isfinite(gw).all()
    with torch.no_grad():
        total2, _ = linear_cross_entropy(h, w, t)
    assert not total2.requires_grad


@pytest.mark.parametrize("block", [64, 8192])
def test_bf16_head_gradient_by_vocabulary_blocks_matches_plain(monkeypatch, block):
    """bf16-mixed writes the head's fp32 gradient a block of vocabulary rows at a time (so no
    full bf16 copy sits beside it); blocks that split the vocabulary unevenly, over several
    position chunks, give the gradient autocast's plain loss gives."""
    import moe.model.loss as loss_mod

    monkeypatch.setattr(loss_mod, "VOCAB_BLOCK", block)
    h, w, t = _case(torch.float32, V=300, shape=(2, 50))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float().view(-1, 300), t.view(-1),
                              ignore_index=IGNORE_INDEX, reduction="sum")
    gh_ref, gw_ref = torch.autograd.grad(ref, (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = linear_cross_entropy(h, w, t, chunk=16)
    gh, gw = torch.autograd.grad(total, (h, w))
    assert gw.dtype == torch.float32
    torch.testing.assert_close(gw, gw_ref, rtol=0, atol=2e-2 * gw_ref.abs().max().item())
    torch.testing.assert_close(gh, gh_ref, rtol=0, atol=2e-2 * gh_ref.abs().max().item())
