import math

import pytest
import torch

from moe.eval.ensemble import ensemble_logprobs


def test_ensemble_is_bayesian_model_averaging():
    # two branches, one sequence of 3 tokens; check by hand
    lp = torch.log(torch.tensor([[[0.5, 0.5, 0.5]], [[0.1, 0.9, 0.9]]], dtype=torch.float64))
    mask = torch.ones(1, 3, dtype=torch.bool)
    got = ensemble_logprobs(lp, mask)[0]
    # t=0: uniform posterior
    p0 = 0.5 * 0.5 + 0.5 * 0.1
    # t=1: posterior ∝ p_e(x0)
    w = torch.tensor([0.5, 0.1]) / 0.6
    p1 = w[0] * 0.5 + w[1] * 0.9
    # t=2: posterior ∝ p_e(x0) p_e(x1)
    w = torch.tensor([0.25, 0.09]) / 0.34
    p2 = w[0] * 0.5 + w[1] * 0.9
    expect = torch.tensor([math.log(p0), math.log(p1), math.log(p2)], dtype=torch.float64)
    torch.testing.assert_close(got, expect)
    # the whole-sequence likelihood equals the uniform mixture of sequence likelihoods
    total = got.sum().exp()
    assert abs(total - 0.5 * (0.125 + 0.1 * 0.81)) < 1e-12


def test_masked_positions_carry_no_evidence():
    lp = torch.log(torch.tensor([[[0.01, 0.5]], [[0.9, 0.5]]], dtype=torch.float64))
    mask = torch.tensor([[False, True]])
    got = ensemble_logprobs(lp, mask)[0, 1]
    torch.testing.assert_close(got, torch.tensor(math.log(0.5), dtype=torch.float64))


def test_identical_branches_give_the_branch():
    lp = torch.log(torch.rand(1, 2, 5, dtype=torch.float64)).expand(3, 2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(ensemble_logprobs(lp, mask), lp[0])


# ----------------------------------------------------------------------------- rolling protocol


def _token_nll_by_hand(model, tokens, prefix, context):
    """Each token's NLL with the context lm-eval's disjoint windows give it (one forward pass per
    token: the slow reference)."""
    seq = [prefix, *tokens]
    n = len(tokens)
    out = []
    for j in range(1, n + 1):
        lo = 0 if (n <= context or j <= context) else min(-(-j // context) * context, n) - context
        with torch.no_grad():
            logits = model(torch.tensor([seq[lo:j]])).logits[0, -1].double()
        out.append(-float(torch.log_softmax(logits, -1)[seq[j]]))
    return out


def test_per_token_scores_are_each_tokens_nll():
    import numpy as np
    from generate_fixtures import tiny_model

    from moe.eval.rolling import score_documents

    model = tiny_model(seed=3, max_seq_len=16)
    g = np.random.default_rng(0)
    docs = [(g.integers(0, 256, n).astype(np.uint16), n) for n in (5, 16, 17, 40)]
    sc = score_documents(model, docs, 256, 16, batch_size=3, pad_id=258, per_token=True)
    for i, (t, _) in enumerate(docs):
        want = _token_nll_by_hand(model, t.tolist(), 256, 16)
        np.testing.assert_allclose(sc.token_nats[i], want, rtol=1e-5)
        assert math.isclose(sc.token_nats[i].sum(), sc.nats[i], rel_tol=1e-12)


def test_rolling_ensemble_mixes_whole_documents():
    """The ensemble's NLL of each held-out document equals Bayesian model averaging over the
    whole document computed by hand from each member's per-token probabilities; an ensemble of
    one model is that model's rolling evaluation."""
    import numpy as np
    from generate_fixtures import tiny_model

    from moe.config import DataConfig
    from moe.data.datamodule import DomainDataModule
    from moe.eval.ensemble import evaluate_ensemble
    from moe.eval.evaluate import evaluate_model

    cfg = DataConfig(domains=["text", "code"], stream="mixed", bytes_per_domain=12_000,
                     seq_len=32)  # fmt: skip
    a, b = tiny_model(seed=1, max_seq_len=32), tiny_model(seed=2, max_seq_len=32)
    rep = evaluate_ensemble([a, b], cfg, 0, ["text", "code"], progress=False, context=24)
    assert rep["protocol"]["kind"] == "rolling" and rep["protocol"]["context"] == 24
    dm = DomainDataModule(cfg, seed=0)
    dm.setup("validate")
    for dom in ("text", "code"):
        docs = dm.heldout_documents(dom)[:3]
        got = rep["domains"][dom]["per_document"]["nats"][:3]
        for (t, _), nats in zip(docs, got):
            lp = [-np.array(_token_nll_by_hand(m, t.tolist(), 256, 24)) for m in (a, b)]
            seen = np.zeros(2)
            want = 0.0
            for j in range(len(t)):  # p(x_j) = sum_e w_e p_e(x_j), w_e ∝ p_e(x_<j)
                w = np.exp(seen - np.logaddexp.reduce(seen))
                want -= math.log(float((w * np.exp([lp[0][j], lp[1][j]])).sum()))
                seen += [lp[0][j], lp[1][j]]
            assert nats == pytest.approx(want, rel=1e-5)
    solo = evaluate_ensemble([a], cfg, 0, ["text"], progress=False)
    alone = evaluate_model(a, cfg, 0, ["text"], progress=False)
    assert solo["domains"]["text"]["bpb"] == pytest.approx(alone["domains"]["text"]["bpb"],
                                                           rel=1e-9)
    assert solo["protocol"] == alone["protocol"]
    chunks = evaluate_ensemble([a, b], cfg, 0, ["text"], 2, progress=False, protocol="chunks")
    assert chunks["protocol"]["kind"] == "chunks"
    assert "per_document" not in chunks["domains"]["text"]
