"""Split/extract/assemble keep the function they claim to keep."""

import dataclasses

import pytest
import torch

from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.model.split import (
    _activation_groups,
    _balanced_assign,
    assemble,
    extract_branch,
    split_model,
)
from moe.model.transformer import Transformer

EXPERTS = ["text", "code", "dna"]


def dense(ffn_dim=48, seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=ffn_dim,
                                   max_seq_len=32)).eval()


def fake_importance(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    F = model.config.ffn_dim
    return {e: [torch.rand(F, generator=g, dtype=torch.float64) for _ in model.layers]
            for e in EXPERTS}


X = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_copy_split_with_normalized_topk_equals_dense(top_k):
    d = dense()
    m, info = split_model(d, EXPERTS, "copy", top_k=top_k)
    m.eval()
    # a non-trivial router so different tokens really pick different experts
    for layer in m.layers:
        torch.nn.init.normal_(layer.ffn.router.weight, std=1.0)
    torch.testing.assert_close(m(X).logits, d(X).logits, atol=1e-5, rtol=1e-5)
    assert info["expert_ffn_dim"] == 48


@pytest.mark.parametrize("method,ffn_dim,shared", [
    ("random", 48, 0), ("random", 50, 0), ("kmeans", 48, 0), ("kmeans", 47, 0),
    ("activation", 48, 0), ("activation", 48, 6), ("activation", 49, 5),
])
def test_partition_split_with_all_experts_weight_one_equals_dense(method, ffn_dim, shared):
    d = dense(ffn_dim)
    imp = fake_importance(d) if method == "activation" else None
    m, info = split_model(d, EXPERTS, method, shared_dim=shared, importance=imp)
    m.eval()
    for layer in m.layers:
        layer.ffn.force_all_experts = True
    torch.testing.assert_close(m(X).logits, d(X).logits, atol=1e-5, rtol=1e-5)
    # every neuron used exactly once across experts (+ shared)
    for sizes in info["groups"]:
        assert sum(sizes) + shared == ffn_dim


def test_partition_is_a_real_partition():
    d = dense(48)
    m, _ = split_model(d, EXPERTS, "random", seed=3)
    w1 = d.layers[0].ffn.w1.weight  # (F, C)
    got = torch.cat([m.layers[0].ffn.w1[e].T for e in range(3)])  # (3*16, C)
    # same rows, permuted
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, w1.tolist()))


def test_activation_split_follows_importance_and_shared_takes_common_neurons():
    imp = torch.tensor([
        [9.0, 0.1, 0.1, 5.0, 1.0, 0.1, 9.0],
        [0.1, 9.0, 0.1, 5.0, 0.1, 1.0, 0.1],
        [0.1, 0.1, 9.0, 5.0, 0.1, 0.1, 0.1],
    ])
    shared, groups = _activation_groups(imp, shared_dim=1)
    assert shared.tolist() == [3]  # the neuron every domain needs
    assert 0 in groups[0].tolist() and 1 in groups[1].tolist() and 2 in groups[2].tolist()
    assert sum(len(g) for g in groups) == 6


def test_balanced_assign_respects_capacity():
    s = torch.tensor([[1.0, 0.0], [0.9, 0.0], [0.8, 0.1], [0.7, 0.2]])
    g = _balanced_assign(s, capacity=2)
    assert g.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("method,shared", [("copy", 0), ("random", 0), ("activation", 8)])
def test_extract_then_assemble_round_trips_bit_for_bit(method, shared):
    d = dense(48)
    imp = fake_importance(d) if method == "activation" else None
    m, _ = split_model(d, EXPERTS, method, shared_dim=shared, importance=imp)
    branches = [extract_branch(m, e) for e in EXPERTS]
    for b in branches:
        assert b.config.ffn_dim == shared + m.config.moe.expert_ffn_dim
    back = assemble(branches, EXPERTS, shared_ffn_dim=shared)
    sd_m, sd_b = m.state_dict(), back.state_dict()
    for k in sd_m:
        if ".router." in k:
            continue
        assert torch.equal(sd_m[k], sd_b[k]), k


def test_copy_branch_equals_dense_seed():
    d = dense()
    m, _ = split_model(d, EXPERTS, "copy")
    b = extract_branch(m, "code")
    sd_d, sd_b = d.state_dict(), b.state_dict()
    assert all(torch.equal(sd_d[k], sd_b[k]) for k in sd_d)


def test_assembled_experts_equal_branch_ffns_and_shared_is_averaged():
    branches = [dense(seed=s) for s in range(3)]
    m = assemble(branches, EXPERTS)
    for li, layer in enumerate(m.layers):
        for e, b in enumerate(branches):
            assert torch.equal(layer.ffn.w1[e], b.layers[li].ffn.w1.weight.T)
            assert torch.equal(layer.ffn.w2[e], b.layers[li].ffn.w2.weight.T)
    mean = torch.stack([b.tok_emb.weight.double() for b in branches]).mean(0).float()
    assert torch.equal(m.tok_emb.weight, mean)


def test_assemble_refuses_mismatched_shapes():
    with pytest.raises(ConfigError, match="ffn_dim"):
        assemble([dense(48), dense(40)], ["a", "b"])


def test_extract_unknown_expert():
    m, _ = split_model(dense(), EXPERTS, "copy")
    with pytest.raises(ConfigError, match="not an expert"):
        extract_branch(m, "law")


def test_split_refuses_moe_input_and_bad_topk():
    m, _ = split_model(dense(), EXPERTS, "copy")
    with pytest.raises(ConfigError, match="already an MoE"):
        split_model(m, EXPERTS)
    with pytest.raises(ConfigError, match="top-k"):
        split_model(dense(), EXPERTS, top_k=4)


def test_domain_router_sends_each_sequence_to_its_expert():
    d = dense()
    m, _ = split_model(d, EXPERTS, "random", router="domain")
    m.eval()
    for e in range(3):
        dom = torch.full((2,), e)
        out = m(X, domain=dom)
        for st in out.router_stats:
            assert (st["expert_ids"] == e).all()
    # hard routing to the code expert equals that expert's branch run densely
    b = extract_branch(m, "code")
    torch.testing.assert_close(m(X, domain=torch.tensor([1, 1])).logits, b(X).logits,
                               atol=1e-5, rtol=1e-5)


def test_router_gradients_flow_and_aux_loss_present():
    torch.manual_seed(0)
    cfg = dataclasses.replace(dense().config, moe=MoEConfig(experts=EXPERTS, top_k=2))
    m = Transformer(cfg).train()
    out = m(X, targets=X)
    (out.loss + out.aux_loss).backward()
    for layer in m.layers:
        g = layer.ffn.router.weight.grad
        assert g is not None and g.abs().sum() > 0
