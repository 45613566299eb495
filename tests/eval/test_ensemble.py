import math

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
