"""The study arm `trimmed`: the seed pruned per domain into experts, assembled, fine-tuned."""

import json

import pytest
import torch
from helpers import DEBUG

from moe.config import load_recipe
from moe.experiments.study.runner import Study
from moe.io.checkpoint import load_checkpoint


def _recipe(tmp_path, *extra):
    return load_recipe(DEBUG / "study.yaml", [
        f"out_dir={tmp_path}", "trainer.enable_progress_bar=false", "study.budget_steps=24",
        "study.arms=[trimmed,monolith]", "study.eval_batches=1", "prune.trim_ffn=0.5", *extra,
    ])  # fmt: skip


def test_trimmed_plan_is_compute_matched(tmp_path):
    st = Study(_recipe(tmp_path), tmp_path)
    names = [s.name for s in st.plan()]
    assert names[:1] == ["seed"] and "trimmed-moe" in names
    assert {"trim-text", "trim-code", "trim-dna", "trimmed"} <= set(names)
    from moe.experiments.study.arms.trimmed import finetune_steps, trimmed_config
    from moe.model.flops import train_flops_per_token

    cfg = trimmed_config(st.ctx)
    assert cfg.ffn_dim == 96 and list(cfg.moe.experts) == ["text", "code", "dna"]
    b = st.ctx.budget
    per_step = train_flops_per_token(cfg, 64) * b.tokens_per_step
    # the MoE fine-tune spends the monolith's post-seed FLOPs, to within half a step
    assert abs(finetune_steps(st.ctx) * per_step - b.monolith_flops_after_seed) <= per_step / 2


@pytest.mark.slow
def test_trimmed_arm_runs(tmp_path):
    st = Study(_recipe(tmp_path), tmp_path)
    st.run()
    seed = load_checkpoint(tmp_path / "stages" / "seed" / "model")
    assembled = load_checkpoint(tmp_path / "stages" / "trimmed" / "model")
    assert assembled.config.moe.expert_ffn_dim == seed.config.ffn_dim // 2
    for e, dom in enumerate(("text", "code", "dna")):
        trim = load_checkpoint(tmp_path / "stages" / f"trim-{dom}" / "model")
        assert trim.meta["prune"]["by"] == dom and trim.meta["parents"] == [seed.meta["id"]]
        # expert e is that domain's trimmed FFN; the shared weights are the seed's
        assert torch.equal(assembled.state_dict["layers.0.ffn.w1"][e],
                           trim.state_dict["layers.0.ffn.w1.weight"].t())
    assert torch.equal(assembled.state_dict["tok_emb.weight"], seed.state_dict["tok_emb.weight"])
    # different domains keep different neurons
    kept = [load_checkpoint(tmp_path / "stages" / f"trim-{d}" / "model").state_dict[
        "layers.0.ffn.w1.weight"] for d in ("text", "dna")]
    assert not torch.equal(kept[0], kept[1])
    res = json.loads((tmp_path / "results.json").read_text())
    m, dense = res["models"]["trimmed-moe"], res["models"]["dense-compute"]
    for dom in ("text", "code", "dna"):
        assert m["eval"][dom]["bpb"] > 0
    step = res["stages"][0]["flops"] / res["stages"][0]["steps"]
    assert abs(m["train_flops"] - dense["train_flops"]) <= step
