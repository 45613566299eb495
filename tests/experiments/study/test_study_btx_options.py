"""BTX options of the study: frozen shared weights (FlexOlmo) and the seed as a generalist."""

import pytest
import torch
from helpers import DEBUG

from moe.config import load_recipe
from moe.experiments.study.runner import Study
from moe.io.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


def test_frozen_shared_weights_and_a_generalist_expert(tmp_path):
    r = load_recipe(DEBUG / "study.yaml", [
        f"out_dir={tmp_path}", "trainer.enable_progress_bar=false", "study.budget_steps=30",
        "study.arms=[seed,branches,btx]", "study.shared=frozen", "study.generalist_expert=true",
        "study.router_top_k=2", "study.eval_batches=1",
    ])
    st = Study(r, tmp_path)
    st.run()
    seed = load_checkpoint(tmp_path / "stages" / "seed" / "model").state_dict
    for dom in ("text", "code", "dna"):
        branch = load_checkpoint(tmp_path / "stages" / f"branch-{dom}" / "model").state_dict
        for k, v in seed.items():
            if ".ffn." in k:
                continue
            # FlexOlmo: only the FFN trains in a branch; attention, norms, embeddings stay
            assert torch.equal(branch[k], v), (dom, k)
        assert any(not torch.equal(branch[k], seed[k]) for k in seed if ".ffn." in k)
    btx = load_checkpoint(tmp_path / "stages" / "btx" / "model")
    assert list(btx.config.moe.experts) == ["text", "code", "dna", "generalist"]
    # the generalist expert is the seed's FFN (experts store w1 as (E, dim, ffn)), and the
    # shared weights are the seed's
    for w in ("w1", "w2", "w3"):
        assert torch.equal(btx.state_dict[f"layers.0.ffn.{w}"][3],
                           seed[f"layers.0.ffn.{w}.weight"].t()), w
    for k in ("tok_emb.weight", "layers.0.attn.wq.weight", "layers.0.attn_norm.weight"):
        assert torch.equal(btx.state_dict[k], seed[k]), k


def test_the_seed_starts_from_a_recipes_init_checkpoint(tmp_path, debug_dense):
    """A pretrained (e.g. imported) checkpoint as `init:` is where the study's seed run starts;
    the budget's FLOPs come from that checkpoint's architecture."""
    from moe.io.checkpoint import read_meta

    r = load_recipe(DEBUG / "study.yaml", [
        f"out_dir={tmp_path}", "trainer.enable_progress_bar=false", f"init={debug_dense}",
        "study.budget_steps=12", "study.arms=[seed,monolith]", "study.eval_batches=1",
        "model.dim=32", "model.ffn_dim=64",  # ignored: the model is init's
    ])
    st = Study(r, tmp_path)
    init_cfg = load_checkpoint(debug_dense / "model").config
    assert init_cfg.dim == 64
    from moe.model.flops import train_flops_per_token

    assert st.ctx.budget.dense_flops_per_step == train_flops_per_token(init_cfg, 64) * 8 * 64
    st.run()
    meta = read_meta(tmp_path / "stages" / "seed" / "model")
    assert meta["parents"] == [load_checkpoint(debug_dense / "model").meta["id"]]
