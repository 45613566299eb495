"""moe/surgery/structure.py: every function-preserving edit keeps the logits (fp32, 1e-5), dense
and MoE, tied and untied, with and without q/k/v biases; removals equal the masked original."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.model.transformer import Transformer
from moe.surgery.structure import (
    NEW,
    grow_ffn,
    grow_width,
    insert_identity,
    keep_channels,
    keep_ffn,
    keep_heads,
    reindex,
    select_layers,
)

VARIANTS = {
    "dense_untied": dict(),
    "dense_tied_bias": dict(tie_embeddings=True, qkv_bias=True),
    "moe_learned": dict(
        moe=MoEConfig(experts=["a", "b", "c"], top_k=2, backend="torch", shared_expert_ffn_dim=16)
    ),  # fmt: skip
    "moe_domain_tied": dict(
        tie_embeddings=True, moe=MoEConfig(experts=["a", "b"], router="domain", backend="torch")
    ),
}


def make(variant: str, seed: int = 0) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A small GQA model (4 query heads, 2 kv groups, head_dim 8) with every tensor random,
    norm gains and biases included (so a wrong rescale or a dropped bias shows)."""
    cfg = ModelConfig(size="debug", vocab_size=40, dim=32, n_layers=3, n_heads=4, n_kv_heads=2,
                      ffn_dim=24, max_seq_len=32, **VARIANTS[variant]).resolved()  # fmt: skip
    torch.manual_seed(seed)
    sd = Transformer(cfg).state_dict()
    g = torch.Generator().manual_seed(seed)
    for name, t in sd.items():
        if name.endswith("norm.weight"):
            sd[name] = 0.5 + torch.rand(t.shape, generator=g)
        else:
            sd[name] = torch.randn(t.shape, generator=g) * 0.15
    return cfg, sd


def logits(cfg, sd, seed: int = 1) -> torch.Tensor:
    model = Transformer(cfg)
    model.load_state_dict(sd)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (3, 16), generator=g)
    dom = torch.tensor([0, 1, 0]) if cfg.moe.router == "domain" and cfg.moe.experts else None
    with torch.no_grad():
        return model(ids, domain=dom).logits.double()


def assert_same(a: torch.Tensor, b: torch.Tensor):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method,noise", [("zero", 0.0), ("split", 0.0), ("split", 0.1)])
def test_grow_ffn_is_exact(variant, method, noise):
    cfg, sd = make(variant)
    cfg2, sd2 = grow_ffn(cfg, sd, 40, method=method, noise=noise, seed=3)
    grown = cfg2.moe.expert_ffn_dim or cfg2.ffn_dim
    assert grown == 40
    assert_same(logits(cfg, sd), logits(cfg2, sd2))


@pytest.mark.parametrize("variant", VARIANTS)
def test_grow_dim_with_heads_is_exact_and_norms_rescaled(variant):
    cfg, sd = make(variant)
    cfg2, sd2 = grow_width(cfg, sd, dim=64, seed=2)  # heads keep their number and size
    assert (cfg2.dim, cfg2.n_heads, cfg2.n_kv_heads, cfg2.head_dim) == (64, 4, 2, 8)
    assert_same(logits(cfg, sd), logits(cfg2, sd2))
    ratio = sd2["layers.0.attn_norm.weight"][:32] / sd["layers.0.attn_norm.weight"]
    assert torch.allclose(ratio, torch.full_like(ratio, (32 / 64) ** 0.5))


@pytest.mark.parametrize("variant", ["dense_tied_bias", "moe_learned"])
def test_grow_heads_by_net2net_split_with_noise_is_exact(variant):
    cfg, sd = make(variant)
    cfg2, sd2 = grow_width(cfg, sd, n_kv_heads=3, method="split", noise=0.2, seed=5)
    assert (cfg2.dim, cfg2.n_heads, cfg2.head_dim) == (32, 6, 8)
    assert_same(logits(cfg, sd), logits(cfg2, sd2))
    # the split copy reads like its original but writes a different share (symmetry broken)
    wq = sd2["layers.0.attn.wq.weight"]  # (6*8, 32)
    wo = sd2["layers.0.attn.wo.weight"]  # (32, 48)
    copies = [j for j in range(2) if torch.equal(wq[32:48], wq[16 * j : 16 * j + 16])]
    assert len(copies) == 1
    j = copies[0]
    assert not torch.allclose(wo[:, 32:48], wo[:, 16 * j : 16 * j + 16])


@pytest.mark.parametrize("variant", VARIANTS)
def test_insert_identity_blocks_is_exact(variant):
    cfg, sd = make(variant)
    cfg2, sd2 = insert_identity(cfg, sd, [0, 2, 2])
    assert cfg2.n_layers == 6
    assert_same(logits(cfg, sd), logits(cfg2, sd2))
    # layer 1 is the copy of old layer 0, its input projections kept and its outputs zeroed
    assert torch.equal(sd2["layers.1.attn.wq.weight"], sd["layers.0.attn.wq.weight"])
    assert sd2["layers.1.attn.wo.weight"].abs().sum() == 0


def test_select_layers_layout_and_deleting_a_block_skips_it():
    cfg, sd = make("moe_learned")
    cfg2, sd2 = select_layers(cfg, sd, [0, 1, 1, 2])  # SOLAR-style duplicate of layer 1
    assert cfg2.n_layers == 4
    for rest in ("attn.wq.weight", "ffn.w1", "ffn.router.weight", "ffn.shared.w2.weight"):
        for new, old in enumerate([0, 1, 1, 2]):
            assert torch.equal(sd2[f"layers.{new}.{rest}"], sd[f"layers.{old}.{rest}"])
    # deleting layer 1 = running the original with layer 1 skipped
    cfg3, sd3 = select_layers(cfg, sd, [0, 2])
    model = Transformer(cfg)
    model.load_state_dict(sd)
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = model.tok_emb(ids)
        cos, sin = model.rope_cos[:12], model.rope_sin[:12]
        for i in (0, 2):
            x = model.layers[i](x, cos, sin)
        ref = torch.nn.functional.linear(model.norm(x), model.head_weight).double()
    small = Transformer(cfg3)
    small.load_state_dict(sd3)
    small.eval()
    with torch.no_grad():
        assert_same(small(ids).logits.double(), ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_per_layer_head_permutation_is_exact(variant):
    cfg, sd = make(variant)
    cfg2, sd2 = reindex(cfg, sd, kv_groups=[[1, 0], [0, 1], [1, 0]])
    assert_same(logits(cfg, sd), logits(cfg2, sd2))
    assert torch.equal(sd2["layers.0.attn.wk.weight"][:8], sd["layers.0.attn.wk.weight"][8:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_keep_width_inverts_grow_width(variant):
    """Grow channels + heads, scramble the heads per layer, then keep the original ones: the
    original state dict back (so removal picks the right rows/columns and undoes the rescale)."""
    cfg, sd = make(variant)
    cfg2, sd2 = grow_width(cfg, sd, dim=64, n_kv_heads=4, seed=1)
    assert_same(logits(cfg, sd), logits(cfg2, sd2))
    cfg3, sd3 = reindex(cfg2, sd2, kv_groups=[[3, 0, 2, 1], [0, 1, 2, 3], [2, 3, 1, 0]])
    assert_same(logits(cfg, sd), logits(cfg3, sd3))
    kept = [[1, 3], [0, 1], [3, 2]]  # where old groups 0 and 1 went, per layer
    cfg4, sd4 = keep_heads(cfg3, sd3, kept, channels=list(range(32)))
    assert dataclasses.asdict(cfg4) == dataclasses.asdict(cfg)
    assert sd4.keys() == sd.keys()
    for k in sd:
        assert torch.allclose(sd4[k], sd[k], atol=1e-6), k
    cfg5, sd5 = keep_channels(cfg2, sd2, list(range(32)), kv_groups=[0, 1])
    assert all(torch.allclose(sd5[k], sd[k], atol=1e-6) for k in sd)


@pytest.mark.parametrize("variant", VARIANTS)
def test_keep_heads_equals_masked_original(variant):
    """Removing kv group 0 (query heads 0 and 1) = the original with those heads' wo columns
    zeroed; per layer, a different group."""
    cfg, sd = make(variant)
    keep = [[1], [0], [1]]
    cfg2, sd2 = keep_heads(cfg, sd, keep)
    assert (cfg2.dim, cfg2.n_heads, cfg2.n_kv_heads, cfg2.head_dim) == (32, 2, 1, 8)
    masked = dict(sd)
    for i, k in enumerate(keep):
        wo = masked[f"layers.{i}.attn.wo.weight"].clone()  # (C, H*Dh)
        gone = 1 - k[0]
        wo[:, 16 * gone : 16 * gone + 16] = 0
        masked[f"layers.{i}.attn.wo.weight"] = wo
    assert_same(logits(cfg2, sd2), logits(cfg, masked))


def test_every_head_removed_only_when_allowed():
    cfg, sd = make("dense_untied")
    with pytest.raises(ConfigError, match="nothing would be left"):
        keep_heads(cfg, sd, [])
    cfg2, sd2 = keep_heads(cfg, sd, [], allow_empty=True)
    assert (cfg2.n_heads, cfg2.n_kv_heads) == (0, 0)
    masked = {k: (v * 0 if k.endswith("attn.wo.weight") else v) for k, v in sd.items()}
    assert_same(logits(cfg2, sd2), logits(cfg, masked))


@pytest.mark.parametrize("variant", VARIANTS)
def test_keep_ffn_equals_masked_original(variant):
    cfg, sd = make(variant)
    keep = [0, 3, 5, 6, 10, 11, 17, 23]
    cfg2, sd2 = keep_ffn(cfg, sd, keep)
    masked = dict(sd)
    drop = [i for i in range(24) if i not in keep]
    for i in range(cfg.n_layers):
        if cfg.moe.experts:
            w2 = masked[f"layers.{i}.ffn.w2"].clone()  # (E, Fe, C)
            w2[:, drop] = 0
            masked[f"layers.{i}.ffn.w2"] = w2
        else:
            w2 = masked[f"layers.{i}.ffn.w2.weight"].clone()  # (C, F)
            w2[:, drop] = 0
            masked[f"layers.{i}.ffn.w2.weight"] = w2
    assert (cfg2.moe.expert_ffn_dim or cfg2.ffn_dim) == 8
    assert_same(logits(cfg2, sd2), logits(cfg, masked))


def test_keep_ffn_per_expert_lists():
    cfg, sd = make("moe_learned")
    per = [[[0, 1], [2, 3], [4, 5]], [[5, 6], [7, 8], [0, 9]], [[1, 2], [3, 4], [5, 6]]]
    cfg2, sd2 = keep_ffn(cfg, sd, per)
    assert torch.equal(sd2["layers.1.ffn.w1"][2], sd["layers.1.ffn.w1"][2][:, [0, 9]])
    assert torch.equal(sd2["layers.2.ffn.w2"][0], sd["layers.2.ffn.w2"][0][[1, 2]])
    logits(cfg2, sd2)  # loads and runs


@pytest.mark.parametrize(
    "call,msg",
    [
        (lambda c, s: select_layers(c, s, []), "removing every layer"),
        (lambda c, s: select_layers(c, s, [0, 3]), "out of range"),
        (lambda c, s: keep_ffn(c, s, []), "nothing would be left"),
        (lambda c, s: keep_ffn(c, s, [0, 0, 1]), "repeated"),
        (lambda c, s: keep_ffn(c, s, [[0, 1], [2, 3]]), "per-layer lists"),
        (lambda c, s: keep_ffn(c, s, [[0, 1], [2, 3], [4]]), "same number"),
        (lambda c, s: keep_heads(c, s, [2]), "out of range"),
        (lambda c, s: keep_heads(c, s, [1, 1]), "repeated"),
        (lambda c, s: keep_channels(c, s, [0, 0] + list(range(2, 16))), "repeated"),
        (lambda c, s: grow_ffn(c, s, 8), "smaller"),
        (lambda c, s: grow_ffn(c, s, 30, method="magic"), "unknown method"),
        (lambda c, s: grow_width(c, s, dim=16), "smaller"),
        (lambda c, s: grow_width(c, s), "give dim"),
        (lambda c, s: insert_identity(c, s, [5]), "out of range"),
        (lambda c, s: keep_channels(c, s, [0, NEW]), "not an index"),
    ],
)
def test_bad_input_is_one_line_config_error(call, msg):
    cfg, sd = make("dense_untied")
    before = {k: v.clone() for k, v in sd.items()}
    with pytest.raises(ConfigError, match=msg) as e:
        call(cfg, sd)
    assert "\n" not in str(e.value)
    assert all(torch.equal(before[k], sd[k]) for k in sd)  # inputs untouched
