"""The capacity controls: budgets in FLOPs, baselines of another size matched on training FLOPs,
sparse upcycling, c-BTM top-1 routing, the BTX variants and the warm-up cap."""

import json

import numpy as np
import pytest
import torch
from helpers import DEBUG

from moe.cli import main
from moe.config import ConfigError, load_recipe
from moe.eval.ensemble import centroid_routes, centroids
from moe.experiments.study.arms import with_requirements
from moe.experiments.study.budget import plan_budget, steps_for_budget, widened_model
from moe.model.flops import count_params, train_flops_per_token
from moe.train.loop import set_trainable

QUIET = ["trainer.enable_progress_bar=false"]


def test_a_budget_in_flops_gives_each_size_its_own_steps():
    r = load_recipe(DEBUG / "study.yaml", ["study.budget_flops=2e10"])
    b = plan_budget(r, with_requirements(["btx", "monolith"]))
    D = train_flops_per_token(r.model.resolved(), 64) * 8 * 64
    assert b.total_steps == round(2e10 / D)
    wide = load_recipe(DEBUG / "study.yaml", ["study.budget_flops=2e10", "model.ffn_dim=256"])
    bw = plan_budget(wide, ["seed", "monolith"])
    assert bw.total_steps < b.total_steps
    assert abs(bw.total_steps * bw.dense_flops_per_step - 2e10) <= bw.dense_flops_per_step / 2
    with pytest.raises(ConfigError, match="less than two steps"):
        plan_budget(load_recipe(DEBUG / "study.yaml", ["study.budget_flops=1e3"]), ["seed"])


def test_wider_baselines_match_the_moes_parameters_and_the_monoliths_flops():
    r = load_recipe(DEBUG / "study.yaml", ["study.budget_steps=100"])
    b = plan_budget(r, with_requirements(["btx", "monolith"]))
    m = r.model.resolved()
    wide = widened_model(r, 3)
    assert wide.ffn_dim == 3 * m.ffn_dim and wide.dim == m.dim
    from moe.experiments.study.budget import moe_config

    moe_total = count_params(moe_config(r)).total
    router = len(r.study.experts) * m.dim * m.n_layers
    assert count_params(wide).total == moe_total - router
    steps = steps_for_budget(r, b, wide)
    per_step = train_flops_per_token(wide, 64) * 8 * 64
    assert abs(steps * per_step - b.total_steps * b.dense_flops_per_step) <= per_step / 2


def test_centroid_routing_by_hand():
    # two domains, four-token pieces: domain 0 = [0 0 1 3] (one piece), domain 1 = [2 2 1 3]
    # [2 2 2 1] (two pieces); df over the 3 pieces: token 0: 1, 1: 3, 2: 2, 3: 2
    cent = centroids([np.array([0, 0, 1, 3]), np.array([2, 2, 1, 3, 2, 2, 2, 1])], vocab_size=4,
                     window=4)
    idf = np.log(3 / np.array([1.0, 3.0, 2.0, 2.0]))  # ln 3, 0 (in every piece), ln 1.5, ln 1.5
    row0 = np.array([2, 1, 0, 1]) * idf
    row1 = np.array([0, 2, 5, 1]) * idf
    np.testing.assert_allclose(cent[0], row0 / np.linalg.norm(row0) * idf)
    np.testing.assert_allclose(cent[1], row1 / np.linalg.norm(row1) * idf)
    # cent ~ [[1.080, 0, 0, 0.074], [0, 0, 0.397, 0.079]]; the context before each position:
    # {} tie -> 0; {2} -> 1; {2,3} 0.074 < 0.477 -> 1; {2,3,0} 1.154 > 0.477 -> 0;
    # {2,3,0,2} 1.154 > 0.874 -> 0; {2,3,0,2,2} 1.154 < 1.271 -> 1
    assert centroid_routes(np.array([2, 3, 0, 2, 2, 2]), cent).tolist() == [0, 1, 1, 0, 0, 1]


def test_centroid_ensemble_scores_each_token_with_its_routed_branch(tmp_path):
    from moe.config import DataConfig
    from moe.data.datamodule import DomainDataModule
    from moe.eval.ensemble import evaluate_ensemble
    from moe.eval.rolling import prefix_token, score_documents
    from moe.model.transformer import Transformer

    r = load_recipe(DEBUG / "dense.yaml", [])
    torch.manual_seed(0)
    models = [Transformer(r.model.resolved()).eval() for _ in range(2)]
    data = DataConfig(**{**r.data.__dict__, "domains": ["text", "code"]})
    rep = evaluate_ensemble(models, data, 0, ["text", "code"], batch_size=4, progress=False,
                            route="centroid", route_domains=["text", "code"])
    dm = DomainDataModule(data, seed=0)
    dm.setup("validate")
    cent = centroids([dm.tokens("text").train, dm.tokens("code").train],
                     r.model.resolved().vocab_size)
    docs = dm.heldout_documents("code")
    prefix = prefix_token(dm.tokenizer)[0]
    per = [score_documents(m, docs, prefix, r.model.resolved().max_seq_len, None, 4,
                           dm.tokenizer.pad_id, per_token=True).token_nats for m in models]
    total = 0.0
    for i, (toks, _) in enumerate(docs):
        route = centroid_routes(toks, cent)
        total += sum(per[e][i][t] for t, e in enumerate(route))
    assert rep["domains"]["code"]["loss"] * rep["domains"]["code"]["tokens"] == pytest.approx(
        total, rel=1e-9)
    right = sum(int((centroid_routes(t, cent) == 1).sum()) for t, _ in docs)
    assert rep["domains"]["code"]["route_accuracy"] == right / rep["domains"]["code"]["tokens"]
    with pytest.raises(ConfigError, match="one domain per ensemble member"):
        evaluate_ensemble(models, data, 0, ["text"], route="centroid", route_domains=["text"])


def test_trainable_moe_trains_ffn_layers_and_routers_only():
    from moe.config import MoEConfig
    from moe.model.transformer import Transformer

    r = load_recipe(DEBUG / "dense.yaml", [])
    import dataclasses

    m = Transformer(dataclasses.replace(r.model.resolved(), moe=MoEConfig(
        experts=["a", "b"], router="learned", top_k=2)))
    set_trainable(m, "moe")
    on = {n for n, p in m.named_parameters() if p.requires_grad}
    assert on and all(".ffn." in n for n in on)
    assert any(".router." in n for n in on)
    assert "tok_emb.weight" not in on and not any(".attn." in n for n in on)


def test_bad_study_choices_are_named():
    for over, match in (("study.moe_trainable=attn", "study.moe_trainable"),
                        ("study.moe_optimizer=adam", "study.moe_optimizer"),
                        ("study.budget_flops=-1", "study.budget_flops")):
        r = load_recipe(DEBUG / "study.yaml", [over])
        from moe.experiments.study import check_study

        with pytest.raises(ConfigError, match=match):
            check_study(r)


@pytest.mark.slow
def test_every_control_is_built_and_matched_on_training_flops(tmp_path):
    out = tmp_path / "run"
    arms = ("[seed,branches,btm,cbtm,family,btx,btx_shared_seed,btx_generalist,monolith,"
            "monolith_params,monolith_active,upcycle]")
    assert main(["run", str(DEBUG / "study.yaml"), f"out_dir={out}", f"study.arms={arms}",
                 *QUIET]) == 0
    res = json.loads((out / "results.json").read_text())
    ms, stages = res["models"], {s["name"]: s for s in res["stages"]}
    ref = ms["dense-compute"]["train_flops"]
    for name in ("dense-params", "dense-active"):
        per_step = stages[name]["flops"] / stages[name]["steps"]
        assert abs(ms[name]["train_flops"] - ref) <= per_step / 2 + 1, name
    moe_step = stages["upcycle"]["flops"] / stages["upcycle"]["steps"]
    assert abs(ms["upcycle"]["train_flops"] - ref) <= moe_step / 2 + 1
    # parameter-matched: the MoE's total parameters less its routers; inference-matched: its
    # active parameters less its routers
    moe = ms["moe"]
    assert 0 < moe["total_params"] - ms["dense-params"]["total_params"] < 0.01 * moe[
        "total_params"]
    assert 0 < moe["active_params"] - ms["dense-active"]["active_params"] < 0.01 * moe[
        "active_params"]
    assert ms["upcycle"]["total_params"] == moe["total_params"]
    # every BTX variant's assembled model is reported beside its fine-tune
    for a, t in (("btx", "moe"), ("btx-seedshared", "moe-seedshared"),
                 ("btx-generalist", "moe-generalist")):
        assert ms[a]["label"].endswith("assembled (before its fine-tune)") and ms[t]["label"]
    assert ms["moe-generalist"]["total_params"] > moe["total_params"]
    assert ms["cbtm"]["eval"]["text"]["bpb"] > 0
    # c-BTM runs one branch per token, the BTM mixture all of them
    assert ms["cbtm"]["active_params"] == ms["branch-text"]["active_params"]
    assert ms["btm"]["active_params"] == ms["cbtm"]["total_params"] == 3 * ms["cbtm"][
        "active_params"]
    # no stage warms up over more than a tenth of its own schedule
    for name in ("ft-code-1", "moe", "dense-params", "upcycle"):
        import yaml

        rec = yaml.safe_load((out / "stages" / name / "recipe.yaml").read_text())
        assert rec["optim"]["warmup_steps"] <= max(1, rec["optim"]["total_steps"] // 10), name
    text = (out / "report.md").read_text()
    for label in ("monolithic, parameter-matched", "monolithic, inference-matched",
                  "sparse upcycling", "c-BTM top-1 ensemble", "assembled (before its fine-tune)"):
        assert label in text, label
    # the upcycled MoE starts as the seed: every expert a copy of its FFN
    from moe.io.checkpoint import load_model

    seed = load_model(out / "stages" / "seed" / "model").model
    init = load_model(out / "stages" / "upcycle-init" / "model").model
    w1 = init.layers[0].ffn.w1
    for e in range(w1.shape[0]):  # experts are stored (E, dim, ffn): the Linear's transpose
        assert torch.equal(w1[e], seed.layers[0].ffn.w1.weight.T)


def test_reports_state_the_top1_routers_accuracy():
    """A c-BTM model's route_accuracy reaches the one-seed and the N-seed report, averaged over
    seeds, as a percentage per domain."""
    from moe.experiments.study.report import aggregate, render_aggregate_report, render_report

    def result(seed: int, acc_code: float) -> dict:
        def ev(bpb: float, acc: float | None = None) -> dict:
            return {d: {"bpb": bpb, **({"route_accuracy": acc if d == "code" else 1.0}
                                       if acc is not None else {})}
                    for d in ("text", "code")}  # fmt: skip

        return {"name": "s", "seed": seed, "domains": ["text", "code"], "experts": ["text", "code"],
                "arms": {"monolithic, compute-matched": "dense-compute",
                         "c-BTM top-1 ensemble": "cbtm"},
                "reference_arm": "monolithic, compute-matched",
                "models": {
                    "dense-compute": {"arm": "monolith", "eval": ev(2.0 + seed / 100)},
                    "cbtm": {"arm": "cbtm", "eval": ev(2.1 + seed / 100, acc_code)}}}  # fmt: skip

    one = render_report(result(0, 0.8))
    assert "code 80.0%" in one and "text 100.0%" in one
    agg = aggregate([result(0, 0.8), result(1, 0.9)])
    assert agg["models"]["cbtm"]["route_accuracy"]["code"]["mean"] == pytest.approx(0.85)
    assert "route_accuracy" not in agg["models"]["dense-compute"]
    assert "code 85.0%" in render_aggregate_report(agg)
