"""moe/surgery/influence.py: Block Influence on hand-made blocks with known answers, and on a real
model against a by-hand forward."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe.config import ModelConfig
from moe.model.transformer import Transformer
from moe.surgery.influence import block_influence
from moe.surgery.structure import insert_identity


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, cos=None, sin=None, domain=None, cache=None):
        return self.fn(x)


def rot90(x):  # rotates each (x0, x1) pair by 90 degrees: orthogonal to x, same norm
    return torch.stack([-x[..., 1], x[..., 0]], dim=-1)


class Toy(nn.Module):
    """Blocks with known BI on 2-D states: identity 0, negation 2, rotation by 90° 1,
    x + rot90(x) (45°) 1 - 1/sqrt(2), scaling by 3 (same direction) 0."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Fn(lambda x: x), Fn(lambda x: -x), Fn(rot90),
                                     Fn(lambda x: x + rot90(x)), Fn(lambda x: 3 * x)])  # fmt: skip

    def forward(self, ids, domain=None, last_logits_only=False):
        x = torch.stack([torch.cos(ids.float()), torch.sin(ids.float())], dim=-1)  # (B, T, 2)
        for layer in self.layers:
            x = layer(x)
        return x


def test_block_influence_hand_made_values():
    batches = [torch.arange(12).view(2, 6), {"input_ids": torch.arange(5).view(1, 5)}]
    bi = block_influence(Toy(), batches)
    expected = [0.0, 2.0, 1.0, 1 - 1 / math.sqrt(2), 0.0]
    assert all(abs(a - b) < 1e-7 for a, b in zip(bi, expected)), bi  # fp32 states


def test_block_influence_on_a_transformer():
    cfg = ModelConfig(size="debug", vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_dim=24, max_seq_len=32).resolved()  # fmt: skip
    torch.manual_seed(0)
    sd = Transformer(cfg).state_dict()
    cfg3, sd3 = insert_identity(cfg, sd, [0])  # layer 1: a block that adds nothing
    model = Transformer(cfg3)
    model.load_state_dict(sd3)
    model.train()
    ids = torch.randint(0, 40, (3, 10), generator=torch.Generator().manual_seed(1))
    bi = block_influence(model, [ids[:2], ids[2:]])
    assert model.training  # mode restored
    assert abs(bi[1]) < 1e-6
    with torch.no_grad():  # by hand
        x = model.tok_emb(ids)
        cos, sin = model.rope_cos[:10], model.rope_sin[:10]
        want = []
        for layer in model.layers:
            y = layer(x, cos, sin)
            want.append(1 - F.cosine_similarity(x.double(), y.double(), dim=-1).mean().item())
            x = y
    assert all(abs(a - b) < 1e-6 for a, b in zip(bi, want)), (bi, want)
    assert bi[0] > 1e-3 and bi[2] > 1e-3
