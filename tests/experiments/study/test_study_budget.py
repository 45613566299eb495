"""The budget planner against a hand-computed case, and the arms registry."""

import pytest
from helpers import DEBUG

from moe.config import ConfigError, load_recipe
from moe.experiments.study.arms import ARMS, with_requirements
from moe.experiments.study.budget import moe_config, plan_budget
from moe.model.flops import train_flops_per_token


def test_budget_hand_computed():
    r = load_recipe(DEBUG / "study.yaml", ["study.budget_steps=100", "study.seed_fraction=0.3",
                                           "study.moe_finetune_fraction=0.2"])
    arms = with_requirements(["family", "btx", "monolith"])
    b = plan_budget(r, arms)
    tps = 8 * 64
    D = train_flops_per_token(r.model.resolved(), 64) * tps
    M = train_flops_per_token(moe_config(r), 64) * tps
    assert b.seed_steps == 30 and b.total_steps == 100
    # 70 post-seed steps: 2 fine-tunes x 5, then 3 branches with 20% more for the MoE fine-tune
    assert b.branch_steps == round((70 - 10) / (3 * 1.2)) == 17
    assert b.moe_steps == round((70 - 3 * 17 - 10) * D / M)
    assert b.data_matched_steps == 30 + 3 * 17 + 10 + b.moe_steps
    assert b.expert_flops_after_seed == pytest.approx((51 + 10) * D + b.moe_steps * M)
    assert abs(b.expert_flops_after_seed - 70 * D) <= M / 2


def test_without_btx_the_branches_take_the_whole_post_seed_budget():
    r = load_recipe(DEBUG / "study.yaml", ["study.budget_steps=100", "study.seed_fraction=0.4"])
    b = plan_budget(r, ["seed", "branches", "btm", "monolith"])
    assert b.branch_steps == 20 and b.moe_steps == 0 and b.n_finetunes == 0


def test_every_arm_is_registered_with_a_description_and_known_requirements():
    assert {"seed", "branches", "btm", "average", "family", "btx", "monolith", "monolith_data",
            "random_split"} <= set(ARMS)
    for name, arm in ARMS.items():
        assert arm.description, name
        assert set(arm.requires) <= set(ARMS), name
    assert with_requirements(["btx"]) == ["seed", "branches", "btx"]


def test_named_choices_are_checked_before_the_study_runs():
    """Names the layers above config register (merge and split methods, arms) are checked by
    the study's own check, before anything is written; the rest at load."""
    from moe.experiments.study.check import check_recipe

    for over, word in (("study.merge_method=tiess", "tiess"), ("study.split_method=knn", "knn"),
                       ("study.arms=[seed,nonsense]", "nonsense"), ("study.shared=both", "both"),
                       ("study.protocol=branch", "branch"), ("optim.schedule=linear", "linear"),
                       ("study.router_init=zero", "zero"), ("study.eval_protocol=perplexity",
                                                             "perplexity")):  # fmt: skip
        with pytest.raises(ConfigError, match=word):
            check_recipe(load_recipe(DEBUG / "study.yaml", [over]))
    for over, msg in ((["study.eval_context=0"], "study.eval_context 0: must be between 1"),
                      (["study.eval_context=100000"], "study.eval_context 100000"),
                      (["study.eval_protocol=chunks", "study.eval_context=8"],
                       "eval_context belongs to study.eval_protocol=rolling")):
        with pytest.raises(ConfigError, match=msg):
            check_recipe(load_recipe(DEBUG / "study.yaml", over))
