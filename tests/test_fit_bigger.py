"""Fitting bigger models: bf16 mixed precision on CPU, activation checkpointing, training a
subset of parameters (optim.trainable)."""

import json

import pytest
import torch
from helpers import DEBUG

from moe.cli import main
from moe.config import ConfigError, ModelConfig, MoEConfig, load_recipe
from moe.model.transformer import Transformer
from moe.train.module import LitLM

QUIET = "trainer.enable_progress_bar=false"


def test_bf16_mixed_step_on_cpu(tmp_path):
    out = tmp_path / "bf16"
    rc = main(["train", str(DEBUG / "dense.yaml"), f"out_dir={out}", "trainer.max_steps=2",
               "trainer.accelerator=cpu", "trainer.precision=bf16-mixed",
               "trainer.limit_val_batches=1", "model.activation_checkpointing=true", QUIET])
    assert rc == 0
    meta = json.loads((out / "model" / "meta.json").read_text())
    assert meta["stage"]["steps"] == 2 and meta["stage"]["tokens"] == 2 * 8 * 64
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["activation_checkpointing"] is True


@pytest.mark.parametrize("experts", [[], ["a", "b", "c"]])
def test_activation_checkpointing_same_loss_and_gradients(experts):
    moe = MoEConfig(experts=experts, top_k=2, backend="torch") if experts else MoEConfig()
    torch.manual_seed(0)
    plain = Transformer(ModelConfig(size="debug", moe=moe))
    ckpt = Transformer(ModelConfig(size="debug", moe=moe, activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 259, (2, 33))
    grads = []
    for m in (plain, ckpt):
        m.train()
        out = m(ids, targets=ids)
        loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0)
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7, msg=n)


def _trainable(which: str, experts=("a", "b")) -> set[str]:
    cfg = ModelConfig(size="debug", moe=MoEConfig(experts=list(experts),
                                                  shared_expert_ffn_dim=32 if experts else 0))
    m = Transformer(cfg)
    lit = LitLM(m, load_recipe(None).optim, ["text"], max_steps=1, seq_len=8, trainable=which)
    return {n for n, p in lit.model.named_parameters() if p.requires_grad}


def test_trainable_sets():
    assert _trainable("experts") == {f"layers.{i}.ffn.{w}" for i in (0, 1)
                                     for w in ("w1", "w2", "w3")}
    assert _trainable("router") == {f"layers.{i}.ffn.router.weight" for i in (0, 1)}
    ffn = _trainable("ffn")
    assert _trainable("experts") < ffn and not any("router" in n or "attn" in n for n in ffn)
    assert any(".shared." in n for n in ffn)
    with pytest.raises(ValueError, match="no parameter"):
        _trainable("experts", experts=())


def test_optim_trainable_recipe_field(tmp_path):
    r = load_recipe(DEBUG / "dense.yaml", ["optim.trainable=ffn"])
    assert r.optim.trainable == "ffn"
    with pytest.raises(ConfigError, match="optim.trainable"):
        load_recipe(DEBUG / "dense.yaml", ["optim.trainable=attention"])
    from moe.train.stages import plan_stage

    assert plan_stage(r).trainable == "ffn"
    assert plan_stage(load_recipe(DEBUG / "dense.yaml")).trainable == "all"
