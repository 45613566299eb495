import math

import pytest
import torch
import torch.nn.functional as F

from moe.config import ModelConfig
from moe.model.flops import count_params, forward_flops_per_token, train_flops_per_token
from moe.model.transformer import IGNORE_INDEX, Transformer, apply_rope, rope_tables


def tiny(**kw) -> ModelConfig:
    return ModelConfig(
        size="debug", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=16, **kw
    )


def test_loss_equals_hand_computed_cross_entropy():
    torch.manual_seed(0)
    m = Transformer(tiny())
    x = torch.randint(0, 256, (3, 10))
    y = torch.randint(0, 256, (3, 10))
    y[0, :4] = IGNORE_INDEX
    out = m(x, targets=y)
    logp = out.logits.double().log_softmax(-1)
    nll, n = 0.0, 0
    for b in range(3):
        for t in range(10):
            if y[b, t] != IGNORE_INDEX:
                nll -= logp[b, t, y[b, t]].item()
                n += 1
    assert out.loss.item() == pytest.approx(nll / n, rel=1e-5)
    assert out.logits.shape == (3, 10, 259)


def test_causal_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    m = Transformer(tiny()).eval()
    x = torch.randint(0, 256, (1, 12))
    x2 = x.clone()
    x2[0, 8:] = (x2[0, 8:] + 7) % 256
    a, b = m(x).logits, m(x2).logits
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_rope_is_a_rotation_that_depends_on_relative_position():
    cos, sin = rope_tables(8, 32, 10000.0)
    q = torch.randn(1, 1, 1, 8).expand(1, 1, 32, 8)
    k = torch.randn(1, 1, 1, 8).expand(1, 1, 32, 8)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    # <R_m q, R_n k> depends on m - n only
    s = (rq[0, 0, 5] * rk[0, 0, 3]).sum()
    s2 = (rq[0, 0, 12] * rk[0, 0, 10]).sum()
    torch.testing.assert_close(s, s2)


def test_tied_embeddings_share_the_matrix_and_have_no_head():
    m = Transformer(tiny(tie_embeddings=True))
    assert m.lm_head is None
    assert "lm_head.weight" not in m.state_dict()
    assert count_params(m.config).total == m.num_params()


def test_too_long_sequence_is_refused():
    m = Transformer(tiny())
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("moe", [False, True])
def test_param_count_matches_module(moe):
    kw = {}
    if moe:
        from moe.config import MoEConfig

        kw["moe"] = MoEConfig(experts=["a", "b", "c"], top_k=2, shared_expert_ffn_dim=8)
    cfg = tiny(**kw)
    m = Transformer(cfg)
    pc = count_params(m.config)
    assert pc.total == m.num_params()
    if moe:
        per_expert = 3 * 32 * 48
        assert pc.total - pc.active == 2 * (3 - 2) * per_expert  # 2 layers, one expert idle each


def test_flops_formula():
    cfg = tiny()
    pc = count_params(cfg)
    norms = 32 * (2 * 2 + 1)
    expect = 2 * (pc.total - pc.embedding - norms) + 2 * 2 * 16 * 32
    assert forward_flops_per_token(cfg, 16) == expect
    assert train_flops_per_token(cfg, 16) == 3 * expect


def test_initial_loss_is_near_uniform():
    torch.manual_seed(0)
    m = Transformer(tiny())
    x = torch.randint(0, 256, (4, 16))
    loss = m(x, targets=x).loss.item()
    assert abs(loss - math.log(259)) < 0.1


def test_gqa_matches_explicit_repeat():
    torch.manual_seed(0)
    m = Transformer(tiny()).eval()
    attn = m.layers[0].attn
    x = torch.randn(2, 6, 32)
    cos, sin = m.rope_cos[:6], m.rope_sin[:6]
    y = attn(x, cos, sin)
    # reference: explicit heads, float64, manual softmax with causal mask
    B, T, H, Hkv, Dh = 2, 6, 4, 2, 8
    q = (x @ attn.wq.weight.T).view(B, T, H, Dh).transpose(1, 2).double()
    k = (x @ attn.wk.weight.T).view(B, T, Hkv, Dh).transpose(1, 2).double()
    v = (x @ attn.wv.weight.T).view(B, T, Hkv, Dh).transpose(1, 2).double()
    q, k = apply_rope(q, cos.double(), sin.double()), apply_rope(k, cos.double(), sin.double())
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(Dh)
    s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    ref = (F.softmax(s, -1) @ v).transpose(1, 2).reshape(B, T, H * Dh) @ attn.wo.weight.T.double()
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
