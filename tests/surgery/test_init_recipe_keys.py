"""`init_from:` + `init_method:` in a recipe: `moe train` starts from the re-made weights."""

import pytest
import torch
from helpers import DEBUG

from moe.config import ConfigError, load_recipe
from moe.io.checkpoint import load_checkpoint
from moe.model.init_dist import init_state
from moe.train.stages import plan_stage

QUIET = "trainer.enable_progress_bar=false"


def test_recipe_init_from_builds_the_same_weights_as_init_state(debug_dense):
    src = load_checkpoint(debug_dense / "model")
    r = load_recipe(DEBUG / "dense.yaml", [f"init_from={debug_dense}", "init_method=shuffle",
                                           "seed=7"])
    plan = plan_stage(r)
    want = init_state(src.state_dict, src.config, "shuffle", seed=7).state_dict
    got = plan.model.state_dict()
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    # a distribution init is a new model: its parent is recorded, its compute is not carried
    assert plan.parent_tokens == 0 and plan.meta["parents"] == [src.meta["id"]]
    assert "base_id" not in plan.meta and plan.meta["init"]["method"] == "shuffle"


def test_recipe_init_from_select_makes_the_recipes_smaller_model(debug_dense):
    r = load_recipe(DEBUG / "dense.yaml", [f"init_from={debug_dense}", "init_method=select",
                                           "model.dim=32", "model.ffn_dim=96"])
    plan = plan_stage(r)
    assert plan.model.config.dim == 32 and plan.model.config.ffn_dim == 96
    assert plan.parent_tokens > 0  # selection carries the source's training


def test_recipe_init_from_refusals(debug_dense):
    from moe.train.stages import plan_stage

    # the method names live in moe/model/init_dist.py: checked by the stage, before it reads
    r = load_recipe(DEBUG / "dense.yaml", [f"init_from={debug_dense}", "init_method=histo"])
    with pytest.raises(ConfigError, match="unknown method 'histo'"):
        plan_stage(r)
    with pytest.raises(ConfigError, match="exclude each other"):
        load_recipe(DEBUG / "dense.yaml", [f"init_from={debug_dense}", f"init={debug_dense}"])
