"""End-to-end merges of tiny checkpoints: results, expert selection, lineage and shape refusals."""

import dataclasses
import json
import os

import pytest
import torch
import yaml

from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.io.checkpoint import load_checkpoint, make_meta, read_meta, save_checkpoint
from moe.merge import load_merge_config, merge, merge_config_from_dict
from moe.model.transformer import Transformer

EXPERTS = ["text", "code", "dna"]


def _save(path, cfg, seed, meta, sd=None):
    if sd is None:
        torch.manual_seed(seed)
        sd = Transformer(cfg).state_dict()
    save_checkpoint(path, sd, cfg, meta)
    return path


def _perturbed(sd, seed, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in sd.items()}


@pytest.fixture
def dense_family(tmp_path):
    """A dense base and two fine-tunes of its code branch (same base_id, family code)."""
    cfg = ModelConfig(size="debug")
    torch.manual_seed(0)
    base_sd = Transformer(cfg).state_dict()
    base_meta = make_meta(kind="branch", family="code", domain="code", tokens_seen=100)
    base = _save(tmp_path / "base", cfg, 0, base_meta, base_sd)
    fts = []
    for i in (1, 2):
        meta = make_meta(
            parents=[base_meta["id"]], base_id=base_meta["base_id"], family="code",
            domain="code", kind="branch", tokens_seen=100 + 10 * i,
        )  # fmt: skip
        fts.append(_save(tmp_path / f"ft{i}", cfg, i, meta, _perturbed(base_sd, i)))
    return base, fts, cfg


def _cfg(method, models, base=None, **kw):
    d = {"merge_method": method, "models": [{"model": str(m)} for m in models]}
    if base is not None:
        d["base_model"] = str(base)
    d.update(kw)
    return merge_config_from_dict(d)


def test_linear_merge_end_to_end(dense_family, tmp_path):
    base, (a, b), cfg = dense_family
    out = merge(_cfg("linear", [a, b]), tmp_path / "out", progress=False)
    got = load_checkpoint(out)
    sa, sb = load_checkpoint(a).state_dict, load_checkpoint(b).state_dict
    for k in sa:
        torch.testing.assert_close(got.state_dict[k], (sa[k] + sb[k]) / 2, rtol=0, atol=1e-7)
    meta = got.meta
    assert meta["kind"] == "merge" and meta["family"] == "code"
    assert meta["parents"] == [read_meta(a)["id"], read_meta(b)["id"]]
    assert meta["base_id"] == read_meta(base)["base_id"]
    assert meta["recipe"]["merge_method"] == "linear"
    Transformer(got.config).load_state_dict(got.state_dict)  # loads as a model


def test_ties_yaml_with_lambda_and_tokens(dense_family, tmp_path):
    base, (a, b), _ = dense_family
    y = tmp_path / "m.yaml"
    y.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(base),
        "models": [{"model": str(a), "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": str(b), "parameters": {"weight": 0.5}}],
        "parameters": {"lambda": 0.8, "density": 0.7},
        "dtype": "bfloat16", "out": str(tmp_path / "tied"),
    }))  # fmt: skip
    c = load_merge_config(y)
    assert c.parameters.scale == 0.8 and c.density(0) == 0.5 and c.density(1) == 0.7
    out = merge(y, progress=False)
    ck = load_checkpoint(out)
    assert all(v.dtype == torch.bfloat16 for v in ck.state_dict.values())
    from moe.merge.registry import MethodParams
    from moe.merge.ties import ties

    name = "layers.0.attn.wq.weight"
    sd = [load_checkpoint(p).state_dict[name] for p in (base, a, b)]
    want = ties(sd[0], sd[1:], MethodParams([1.0, 0.5], [0.5, 0.7], True, 0.8, name=name))
    torch.testing.assert_close(ck.state_dict[name], want.bfloat16())
    # tokens: 100 (base) + 10 + 20 (the two fine-tunes' own tokens)
    assert ck.meta["tokens_seen"] == 130
    assert ck.meta["recipe"]["parameters"]["lambda"] == 0.8


def test_dare_is_deterministic(dense_family, tmp_path):
    base, (a, b), _ = dense_family
    c = _cfg("dare_ties", [a, b], base, parameters={"density": 0.5, "seed": 3})
    o1 = load_checkpoint(merge(c, tmp_path / "o1", progress=False)).state_dict
    o2 = load_checkpoint(merge(c, tmp_path / "o2", progress=False)).state_dict
    assert all(torch.equal(o1[k], o2[k]) for k in o1)
    c.parameters.seed = 4
    o3 = load_checkpoint(merge(c, tmp_path / "o3", progress=False)).state_dict
    assert not all(torch.equal(o1[k], o3[k]) for k in o1)


def test_slerp_endpoint_reproduces_model(dense_family, tmp_path):
    _, (a, b), _ = dense_family
    out = merge(_cfg("slerp", [a, b], parameters={"t": 0.0}), tmp_path / "s", progress=False)
    sa, so = load_checkpoint(a).state_dict, load_checkpoint(out).state_dict
    assert all(torch.allclose(so[k], sa[k], atol=1e-6) for k in sa)


def test_moe_expert_selection_leaves_others_identical(tmp_path):
    cfg = ModelConfig(size="debug", moe=MoEConfig(experts=EXPERTS, top_k=2))
    torch.manual_seed(0)
    base_sd = Transformer(cfg).state_dict()
    bmeta = make_meta(kind="moe")
    base = _save(tmp_path / "moe", cfg, 0, bmeta, base_sd)
    fts = [
        _save(tmp_path / f"ft{i}", cfg, i, make_meta(base_id=bmeta["base_id"], kind="moe"),
              _perturbed(base_sd, i))
        for i in (1, 2)
    ]  # fmt: skip
    out = merge(_cfg("task_arithmetic", fts, base, expert="code"), tmp_path / "o", progress=False)
    got = load_checkpoint(out).state_dict
    fa, fb = (load_checkpoint(p).state_dict for p in fts)
    e = EXPERTS.index("code")
    for k, v in base_sd.items():
        if k.endswith(("ffn.w1", "ffn.w3", "ffn.w2")):
            for j in range(len(EXPERTS)):
                if j == e:
                    want = base_sd[k][e] + (fa[k][e] - base_sd[k][e]) + (fb[k][e] - base_sd[k][e])
                    torch.testing.assert_close(got[k][j], want)
                else:
                    assert torch.equal(got[k][j], v[j]), (k, j)
        else:
            assert torch.equal(got[k], v), k  # router, attention, norms: the base's, bitwise
    with pytest.raises(ConfigError, match="'math' is not an expert .*text, code, dna"):
        merge(_cfg("linear", fts, expert="math"), tmp_path / "o2", progress=False)


def test_cross_family_refused_names_families(dense_family, tmp_path):
    base, (a, _), cfg = dense_family
    meta = read_meta(a)
    other = _save(tmp_path / "text", cfg, 5, make_meta(base_id=meta["base_id"], family="text"))
    with pytest.raises(ConfigError, match=r"different expert families.*'code'.*'text'"):
        merge(_cfg("linear", [a, other]), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    merge(_cfg("linear", [a, other], allow_cross_family=True), tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match="expert: 'dna'.*'code'"):
        merge(_cfg("linear", [a, base], expert="dna"), tmp_path / "o3", progress=False)


def test_different_base_refused(dense_family, tmp_path):
    _, (a, _), cfg = dense_family
    stranger = _save(tmp_path / "s", cfg, 9, make_meta(family="code"))
    with pytest.raises(ConfigError, match="lineage differs.*descends from base"):
        merge(_cfg("linear", [a, stranger]), tmp_path / "o", progress=False)


def test_shape_mismatch_names_tensor_even_cross_family(dense_family, tmp_path):
    _, (a, _), _ = dense_family
    big = dataclasses.replace(ModelConfig(size="debug"), vocab_size=300)
    other = _save(tmp_path / "big", big, 1, make_meta(base_id=read_meta(a)["base_id"]))
    with pytest.raises(ConfigError, match="vocab_size"):
        merge(_cfg("linear", [a, other], allow_cross_family=True), tmp_path / "o")
    # same config, one tensor of a different shape: refused as the input is opened (its weights
    # disagree with its own config.json), naming the field and the tensor
    sd = load_checkpoint(a).state_dict
    sd["layers.1.attn.wo.weight"] = torch.zeros(64, 32)
    odd = _save(tmp_path / "odd", ModelConfig(size="debug"), 0, read_meta(a) | {"id": "x"}, sd)
    with pytest.raises(ConfigError, match=r"n_heads x head size .*\(layers\.1\.attn\.wo\.weight "
                       r"has shape \(64, 32\)"):
        merge(_cfg("linear", [a, odd], allow_cross_family=True), tmp_path / "o")


def test_config_errors(dense_family, tmp_path):
    base, (a, b), _ = dense_family
    with pytest.raises(ConfigError, match=r"models\[1\]\.model: no such checkpoint"):
        _cfg("linear", [a, tmp_path / "missing"])
    with pytest.raises(ConfigError, match="unknown method 'soup'"):
        _cfg("soup", [a, b])
    with pytest.raises(ConfigError, match="exactly two models"):
        _cfg("slerp", [a, b, base], parameters={"t": 0.5})
    with pytest.raises(ConfigError, match="parameters.t"):
        _cfg("slerp", [a, b])
    with pytest.raises(ConfigError, match="base_model"):
        _cfg("ties", [a, b])
    with pytest.raises(ConfigError, match="density must be in"):
        _cfg("ties", [a, b], base, parameters={"density": 1.5})
    with pytest.raises(ConfigError, match="unknown key 'modles'"):
        merge_config_from_dict({"merge_method": "linear", "modles": []})
    y = tmp_path / "bad.yaml"
    y.write_text("merge_method: linear\nmodels:\n  - model: x\n    parameters: {weight: heavy}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: models\[0\]\.parameters\.weight: a number"):
        load_merge_config(y)
    with pytest.raises(ConfigError, match="merge config not found"):
        load_merge_config(tmp_path / "nope.yaml")


def test_existing_out_refused_and_untouched(dense_family, tmp_path):
    _, (a, b), _ = dense_family
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        merge(_cfg("linear", [a, b]), out, progress=False)
    assert os.listdir(out) == ["keep.txt"]
    merge(_cfg("linear", [a, b]), out, overwrite=True, progress=False)
    assert (out / "meta.json").is_file() and not (out / "keep.txt").exists()


def test_hf_directory_merge(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64,
    )  # fmt: skip
    dirs = []
    for i in range(2):
        torch.manual_seed(i)
        m = transformers.LlamaForCausalLM(cfg)
        m.save_pretrained(tmp_path / f"hf{i}")
        dirs.append(tmp_path / f"hf{i}")
    out = merge(_cfg("linear", dirs), tmp_path / "hfout", progress=False)
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 32
    merged = transformers.LlamaForCausalLM.from_pretrained(out)
    ms = [transformers.LlamaForCausalLM.from_pretrained(d).state_dict() for d in dirs]
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, (ms[0][k] + ms[1][k]) / 2)
    with pytest.raises(ConfigError, match="Hugging Face directory"):
        merge(_cfg("linear", dirs, expert="code"), tmp_path / "o2", progress=False)
