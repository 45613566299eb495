"""Forking: a run continued from another run's final state equals the run that never forked."""

import pytest
import torch
from helpers import DEBUG

from moe.config import load_recipe
from moe.io.checkpoint import load_checkpoint
from moe.train.stages import train

pytestmark = pytest.mark.slow

BASE = ["trainer.enable_progress_bar=false", "optim.schedule=wsd", "optim.total_steps=12",
        "optim.warmup_steps=2", "trainer.val_check_interval=4",
        "trainer.checkpoint_every_n_steps=4", "overwrite=true"]


def run(out, *over):
    return train(load_recipe(DEBUG / "dense.yaml", [*BASE, f"out_dir={out}", *over]))


@pytest.mark.parametrize("fork_at", [6, 8])  # between periodic saves, and on one
def test_continuing_after_a_fork_is_bit_identical_to_never_forking(tmp_path, fork_at):
    straight = run(tmp_path / "a", "trainer.max_steps=12")
    run(tmp_path / "seed", f"trainer.max_steps={fork_at}")
    cont = run(tmp_path / "cont", "trainer.max_steps=12", f"fork={tmp_path / 'seed'}",
               f"init={tmp_path / 'seed' / 'model'}")
    a, c = load_checkpoint(straight), load_checkpoint(cont)
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], c.state_dict[k]), k
    # the ledger: the continued run counts only its own steps and tokens
    assert c.meta["stage"]["steps"] == 12 - fork_at
    assert c.meta["stage"]["first_step"] == fork_at
    assert c.meta["tokens_seen"] == a.meta["tokens_seen"]
    assert c.meta["stage"]["tokens"] == (12 - fork_at) * 8 * 64


def test_a_fork_carries_the_optimizer_state(tmp_path):
    """A branch forked onto another stream starts from the parent's AdamW moments and LR."""
    run(tmp_path / "seed", "trainer.max_steps=6")
    parent = torch.load(tmp_path / "seed" / "resume" / "last.ckpt", weights_only=True)
    run(tmp_path / "branch", "trainer.max_steps=7", "stage=branch", "branch.domain=code",
        f"fork={tmp_path / 'seed'}", f"init={tmp_path / 'seed' / 'model'}")
    child = torch.load(tmp_path / "branch" / "resume" / "last.ckpt", weights_only=True)
    assert child["global_step"] == 7
    p_state = parent["optimizer_states"][0]["state"]
    c_state = child["optimizer_states"][0]["state"]
    # AdamW's step counter went on from the parent's (a fresh optimizer would be at 1)
    assert float(c_state[0]["step"]) == float(p_state[0]["step"]) + 1
    meta = load_checkpoint(tmp_path / "branch" / "model").meta
    assert meta["stage"]["tokens_by_domain"] == {"code": 8 * 64}
    assert meta["domain"] == "code"


def test_fork_needs_init_and_excludes_resume(tmp_path):
    from moe.config import ConfigError

    with pytest.raises(ConfigError, match="fork= needs init="):
        load_recipe(DEBUG / "dense.yaml", [f"fork={tmp_path}"])
    with pytest.raises(ConfigError, match="exclude each other"):
        load_recipe(DEBUG / "dense.yaml", [f"fork={tmp_path}", f"init={tmp_path}",
                                           f"resume={tmp_path}"])
