"""Experts at inference: drop, keep or add experts and change top-k (moe experts, moe eval
--experts, moe generate --experts), against the full model and hand computations."""

import json

import pytest
import torch

from moe.cli import main
from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.generate.command import generate_command
from moe.io.checkpoint import load_model, make_meta, save_checkpoint
from moe.model.expert_subset import plan_experts, restrict_experts
from moe.model.moe_layer import dense_swiglu
from moe.model.transformer import Transformer

EXPERTS = ["text", "code", "dna"]


def moe_model(router="learned", top_k=2, seed=0, **moe) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=24,
                                max_seq_len=32, moe=MoEConfig(experts=EXPERTS, router=router,
                                                              top_k=top_k, **moe)))
    for p in m.parameters():  # larger than the init's 0.02: routing that depends on the input
        torch.nn.init.normal_(p, std=0.3)
    return m.eval()


X = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(1))


def test_dropping_a_domain_expert_leaves_the_other_domains_exactly():
    full = moe_model(router="domain")
    with torch.no_grad():
        want = full(X, domain=torch.tensor([0, 2])).logits  # text, dna
        sub = moe_model(router="domain")
        restrict_experts(sub, ["text", "dna"])
        got = sub(X, domain=torch.tensor([0, 1])).logits  # dna is expert 1 now
    assert sub.config.moe.experts == ["text", "dna"]
    assert torch.equal(got, want)


def test_dropped_learned_router_equals_removing_the_logit_before_topk():
    """Every MoE layer of the full model routed by hand with the dropped expert's logit removed
    (masked to -inf before the softmax, so the top-k and the softmax see the others only)."""
    full = moe_model(top_k=2)
    sub = moe_model(top_k=2)
    restrict_experts(sub, ["text", "dna"])
    drop = EXPERTS.index("code")
    for lay in full.layers:
        ffn = lay.ffn

        def route(x_TD, domain_T, ffn=ffn):
            logits = ffn.router(x_TD).float()
            logits[:, drop] = float("-inf")
            p = logits.softmax(-1)
            w, ids = torch.sort(p, dim=-1, descending=True, stable=True)
            w = w[:, :2] / w[:, :2].sum(-1, keepdim=True)
            return w.to(x_TD.dtype), ids[:, :2].contiguous(), None

        ffn.route = route
    with torch.no_grad():
        want = full(X).logits
        got = sub(X).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # the dropped expert is never chosen, and the kept ones keep their weights
    assert not any((st["expert_ids"] == drop).any() for st in full(X).router_stats)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_subset_layer_equals_hand_computation(scoring, top_k):
    m = moe_model(top_k=3, scoring=scoring, bias_update_rate=0.1).double()
    for lay in m.layers:
        lay.ffn.score_bias.copy_(torch.tensor([0.0, 0.2, -0.1]))
    ffn0 = m.layers[0].ffn
    W, b = ffn0.router.weight.detach().clone(), ffn0.score_bias.clone()
    w1, w3, w2 = (t.detach().clone() for t in (ffn0.w1, ffn0.w3, ffn0.w2))
    restrict_experts(m, ["text", "dna"], top_k)
    x = torch.randn(7, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = m.layers[0].ffn(x[None])[0]
    kept = [0, 2]
    for t in range(7):
        z = torch.stack([W[e] @ x[t] for e in kept])
        s = z.softmax(0) if scoring == "softmax" else z.sigmoid()
        order = sorted(range(2), key=lambda j: (-(float(s[j]) + float(b[kept[j]])), j))[:top_k]
        w = s[order] / s[order].sum()
        ref = sum(w[i] * dense_swiglu(x[t][None], w1[kept[j]], w3[kept[j]], w2[kept[j]])[0]
                  for i, j in enumerate(order))
        torch.testing.assert_close(y[t], ref, atol=1e-6, rtol=1e-6)


def test_plan_errors_and_top_k_clamp():
    cfg = moe_model(top_k=2).config
    assert plan_experts(cfg, drop=["code", "dna"]) == (["text"], 1, [
        "top_k 2 -> 1: only 1 expert left"])
    for kw, msg in ((dict(drop=EXPERTS), "no expert"), (dict(keep=["rna"]), "not an expert"),
                    (dict(top_k=0), "between 1"), (dict(keep=["text"], top_k=2), "between 1"),
                    (dict(keep=["text"], drop=["dna"]), "not both")):
        with pytest.raises(ConfigError, match=msg):
            plan_experts(cfg, **kw)
    with pytest.raises(ConfigError, match="dense"):
        plan_experts(ModelConfig().resolved(), drop=["text"])
    with pytest.raises(ConfigError, match="learned router"):
        plan_experts(moe_model(router="domain").config, top_k=1)


def save(model: Transformer, path, base_id="seed0") -> str:
    meta = make_meta(kind="moe", base_id=base_id)
    return str(save_checkpoint(path, model.state_dict(), model.config, meta))


def test_moe_experts_writes_the_subset(tmp_path):
    m = moe_model(top_k=2, bias_update_rate=0.01)
    for lay in m.layers:
        lay.ffn.score_bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    ck = save(m, tmp_path / "full")
    out = tmp_path / "sub"
    assert main(["experts", ck, "--drop", "code", "--out", str(out)]) == 0
    sub = load_model(out)
    assert sub.model.config.moe.experts == ["text", "dna"]
    assert sub.meta["parents"] == [json.loads((tmp_path / "full/meta.json").read_text())["id"]]
    assert sub.meta["experts_edit"]["dropped"] == ["code"]
    sd, full_sd = sub.model.state_dict(), m.state_dict()
    for name in ("layers.1.ffn.w1", "layers.1.ffn.router.weight", "layers.1.ffn.score_bias"):
        assert torch.equal(sd[name], full_sd[name][[0, 2]])
    ref = moe_model(top_k=2, bias_update_rate=0.01)
    ref.load_state_dict(full_sd)
    restrict_experts(ref, ["text", "dna"])
    with torch.no_grad():
        assert torch.equal(sub.model.eval()(X).logits, ref(X).logits)
    # --keep one expert: top-k clamps to 1, said on stderr
    assert main(["experts", ck, "--keep", "dna", "--out", str(tmp_path / "one")]) == 0
    assert load_model(tmp_path / "one").model.config.moe.top_k == 1


@pytest.mark.parametrize("args", [
    ["--drop", "text,code,dna"],
    ["--drop", "rna"],
    ["--keep", "text", "--top-k", "2"],
    ["--top-k", "0"],
    ["--top-k", "4"],
    ["--keep", "text", "--drop", "dna"],
    [],
    ["--add", "rna"],
])
def test_moe_experts_refuses_bad_requests(tmp_path, args, capsys):
    ck = save(moe_model(), tmp_path / "full")
    out = tmp_path / "out"
    assert main(["experts", ck, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe: error:") and "\n" not in err
    assert not out.exists()


def test_moe_experts_adds_an_expert_of_the_same_lineage(tmp_path):
    full = moe_model(router="domain")
    ck = save(full, tmp_path / "full")
    assert main(["experts", ck, "--drop", "dna", "--out", str(tmp_path / "two")]) == 0
    # dna back from the full checkpoint: the model computes the full one again
    assert main(["experts", str(tmp_path / "two"), "--add", f"dna={ck}:dna",
                 "--out", str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back").model.eval()
    assert back.config.moe.experts == EXPERTS
    with torch.no_grad():
        assert torch.equal(back(X, domain=torch.tensor([2, 1])).logits,
                           full(X, domain=torch.tensor([2, 1])).logits)
    # a learned router: the added expert's router row is zero, its weights the source's
    lrn = moe_model(top_k=2)
    lck = save(lrn, tmp_path / "lrn")
    assert main(["experts", lck, "--drop", "code", "--out", str(tmp_path / "l2")]) == 0
    assert main(["experts", str(tmp_path / "l2"), "--add", f"code2={lck}:code", "--top-k", "3",
                 "--out", str(tmp_path / "l3")]) == 0
    l3 = load_model(tmp_path / "l3").model
    assert l3.config.moe.experts == ["text", "dna", "code2"] and l3.config.moe.top_k == 3
    assert torch.equal(l3.layers[0].ffn.w2[2], lrn.layers[0].ffn.w2[1])
    assert torch.equal(l3.layers[0].ffn.router.weight[2], torch.zeros(16))
    # another lineage, or an expert the source lacks: refused, nothing written
    other = save(moe_model(seed=1), tmp_path / "other", base_id="seed1")
    for spec, msg in ((f"x={other}:code", "lineage"), (f"x={lck}:rna", "experts are")):
        with pytest.raises(ConfigError, match=msg):
            from moe.surgery.experts_subset import experts_checkpoint

            experts_checkpoint(tmp_path / "l2", tmp_path / "bad", add=[spec])
        assert not (tmp_path / "bad").exists()


def test_generate_with_a_subset_equals_the_written_subset(tmp_path):
    ck = save(moe_model(top_k=2), tmp_path / "full")
    assert main(["experts", ck, "--keep", "text,dna", "--top-k", "1",
                 "--out", str(tmp_path / "sub")]) == 0
    outs: list[str] = []
    kw = dict(prompt="ab", max_new_tokens=6, device="cpu", out=outs.append, err=lambda s: None)
    g_mem = generate_command(ck, experts=["text", "dna"], expert_top_k=1, **kw)
    g_disk = generate_command(str(tmp_path / "sub"), **kw)
    assert g_mem.ids == g_disk.ids
    with pytest.raises(ConfigError, match="--experts 'rna'"):
        generate_command(ck, experts=["rna"], **kw)
    dom = save(moe_model(router="domain"), tmp_path / "dom")
    with pytest.raises(ConfigError, match="dna"):  # the domain's expert was dropped
        generate_command(dom, experts=["text"], domain="dna", **kw)


def test_eval_refuses_a_bad_subset_before_any_work(tmp_path, capsys):
    ck = save(moe_model(), tmp_path / "full")
    for args in (["--experts", "rna"], ["--expert-top-k", "4"], ["--experts", "text",
                 "--tasks", "x"]):
        assert main(["eval", ck, *args]) == 2
        assert "\n" not in capsys.readouterr().err.strip()
    assert not list((tmp_path / "full").glob("eval*.json"))
