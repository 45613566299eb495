"""CPU tests of moe_kernels.topk_route and moe_kernels.plan (torch paths) against the
references, including the tie rule and validation."""

from __future__ import annotations

import moe_kernels as mk
import pytest
import torch
from moe_kernels import reference as ref


@pytest.mark.parametrize("T,E,k", [(1, 1, 1), (37, 5, 3), (64, 13, 13), (50, 64, 8), (8, 7, 1)])
@pytest.mark.parametrize("normalize", [True, False])
def test_topk_route_matches_reference(T, E, k, normalize):
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T + E + k))
    w, ids = mk.topk_route(logits, k, normalize=normalize)
    w_ref, ids_ref = ref.topk_route_ref(logits, k, normalize=normalize)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref.float())
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    if normalize:
        torch.testing.assert_close(w.sum(1), torch.ones(T))


def test_topk_route_ties_go_to_lower_expert_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    _, ids = mk.topk_route(logits, 3)
    assert ids.tolist() == [[1, 2, 4], [0, 1, 2]]
    _, ids1 = mk.topk_route(logits, 1)
    assert ids1.tolist() == [[1], [0]]


def test_topk_route_float64_stays_float64():
    w, _ = mk.topk_route(torch.randn(4, 6, dtype=torch.float64), 2)
    assert w.dtype == torch.float64


@pytest.mark.parametrize("bad_k", [0, 6, -1, 2.0])
def test_topk_route_rejects_bad_k(bad_k):
    with pytest.raises(ValueError, match="k must be an int in 1..E=5"):
        mk.topk_route(torch.randn(3, 5), bad_k)


def test_topk_route_rejects_bad_logits():
    with pytest.raises(ValueError, match="2-D"):
        mk.topk_route(torch.randn(3, 4, 5), 1)
    with pytest.raises(ValueError, match="floating point"):
        mk.topk_route(torch.ones(3, 4, dtype=torch.int64), 1)


@pytest.mark.parametrize("T,K,E,skew", [(1, 1, 1, False), (33, 3, 7, False), (100, 4, 64, True),
                                        (40, 2, 9, True)])
def test_plan_matches_reference(T, K, E, skew):
    gen = torch.Generator().manual_seed(T * K + E)
    if skew:  # most assignments on expert 0, several experts empty
        ids = torch.where(torch.rand(T, K, generator=gen) < 0.7, 0,
                          torch.randint(0, E, (T, K), generator=gen))
    else:
        ids = torch.randint(0, E, (T, K), generator=gen)
    p = mk.plan(ids, E)
    order, counts, offsets = ref.plan_ref(ids, E)
    assert torch.equal(p.order, order)
    assert torch.equal(p.counts.long(), counts)
    assert torch.equal(p.offsets, offsets) and p.offsets.dtype == torch.int32
    assert p.offsets.numel() == E + 1
    assert torch.equal(p.inv[p.order], torch.arange(T * K))
    assert torch.equal(p.token, p.order // K)


def test_plan_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="expert id out of range"):
        mk.plan(torch.tensor([[0, 4]]), 4)
    with pytest.raises(ValueError, match="expert id out of range"):
        mk.plan(torch.tensor([[-1, 2]]), 4)
    with pytest.raises(ValueError, match="2-D"):
        mk.plan(torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError, match="int32 or int64"):
        mk.plan(torch.tensor([[0.0, 1.0]]), 4)
