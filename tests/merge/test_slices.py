"""mergekit `slices:` / `layer_range` and `passthrough` (moe/merge/slices.py): the stacked tensor
layout, equality with the `models:` merge when one slice covers the whole model, bad input."""

from __future__ import annotations

import pytest
import torch
import yaml

from moe.cli import main
from moe.config import ModelConfig
from moe.io.checkpoint import load_checkpoint, make_meta, save_checkpoint
from moe.merge import merge
from moe.model.transformer import Transformer


@pytest.fixture
def family(tmp_path):
    """A 4-layer base and two perturbed fine-tunes of it (one lineage)."""
    cfg = ModelConfig(size="debug", dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=48,
                      max_seq_len=32).resolved()  # fmt: skip
    torch.manual_seed(0)
    base_sd = Transformer(cfg).state_dict()
    base_meta = make_meta(kind="dense", tokens_seen=10)
    paths = {"base": save_checkpoint(tmp_path / "base", base_sd, cfg, base_meta)}
    for i, name in enumerate(("a", "b")):
        g = torch.Generator().manual_seed(i + 1)
        sd = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base_sd.items()}
        meta = make_meta(kind="dense", parents=[base_meta["id"]], base_id=base_meta["id"])
        paths[name] = save_checkpoint(tmp_path / name, sd, cfg, meta)
    return paths


def write(tmp_path, cfg: dict, name="m.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def src(model, a, b, **params):
    d = {"model": str(model), "layer_range": [a, b]}
    if params:
        d["parameters"] = params
    return d


def test_solar_passthrough_stacks_the_expected_layers(family, tmp_path):
    """A mergekit SOLAR config: layers 0-3 then 1-4 of one model -> 6 layers [0,1,2,1,2,3]."""
    cfg = {"merge_method": "passthrough", "dtype": "float32",
           "slices": [{"sources": [src(family["base"], 0, 3)]},
                      {"sources": [src(family["base"], 1, 4)]}]}  # fmt: skip
    out = merge(write(tmp_path, cfg), out=tmp_path / "solar", progress=False)
    a, b = load_checkpoint(family["base"]), load_checkpoint(out)
    assert b.config.n_layers == 6
    for new, old in enumerate([0, 1, 2, 1, 2, 3]):
        for k in a.state_dict:
            if k.startswith(f"layers.{old}."):
                suffix = k.split(".", 2)[2]
                assert torch.equal(b.state_dict[f"layers.{new}.{suffix}"], a.state_dict[k])
    for k in ("tok_emb.weight", "norm.weight", "lm_head.weight"):
        assert torch.equal(b.state_dict[k], a.state_dict[k])
    m = Transformer(b.config)
    m.load_state_dict(b.state_dict)  # a valid model of the new depth
    assert b.meta["recipe"]["slices"][1]["sources"][0]["layer_range"] == [1, 4]


def test_frankenmerge_of_two_models(family, tmp_path):
    cfg = {"merge_method": "passthrough",
           "slices": [{"sources": [src(family["a"], 0, 2)]},
                      {"sources": [src(family["b"], 2, 4)]}]}  # fmt: skip
    out = load_checkpoint(merge(write(tmp_path, cfg), out=tmp_path / "fm", progress=False))
    a, b = load_checkpoint(family["a"]).state_dict, load_checkpoint(family["b"]).state_dict
    assert torch.equal(out.state_dict["layers.1.attn.wq.weight"], a["layers.1.attn.wq.weight"])
    assert torch.equal(out.state_dict["layers.2.attn.wq.weight"], b["layers.2.attn.wq.weight"])
    assert torch.equal(out.state_dict["layers.3.ffn.w2.weight"], b["layers.3.ffn.w2.weight"])
    assert torch.equal(out.state_dict["tok_emb.weight"], a["tok_emb.weight"])


@pytest.mark.parametrize(
    "method,params,with_base",
    [
        ("linear", {"weight": 1.0}, False),
        ("slerp", {"t": 0.3}, False),
        ("ties", {"density": 0.5, "lambda": 1.0}, True),
        ("dare_linear", {"density": 0.5, "seed": 3}, True),
    ],
)
def test_one_full_slice_equals_the_models_merge(family, tmp_path, method, params, with_base):
    models = [{"model": str(family["a"])}, {"model": str(family["b"])}]
    plain = {"merge_method": method, "models": models, "parameters": params}
    sources = [src(family["a"], 0, 4), src(family["b"], 0, 4)]
    if with_base:
        plain["base_model"] = str(family["base"])
        sources = [src(family["base"], 0, 4), *sources]
    sliced = {k: v for k, v in plain.items() if k != "models"} | {"slices": [{"sources": sources}]}
    x = load_checkpoint(merge(write(tmp_path, plain, "p.yaml"), out=tmp_path / "p",
                              progress=False)).state_dict  # fmt: skip
    y = load_checkpoint(merge(write(tmp_path, sliced, "s.yaml"), out=tmp_path / "s",
                              progress=False)).state_dict  # fmt: skip
    assert x.keys() == y.keys()
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_slerp_slices_by_range(family, tmp_path):
    """Per-range merge: a 2-layer output whose layer j is slerp of a's layer j and b's j + 2."""
    cfg = {"merge_method": "slerp", "parameters": {"t": 0.0},
           "slices": [{"sources": [src(family["a"], 0, 2), src(family["b"], 2, 4)]}]}  # fmt: skip
    out = load_checkpoint(merge(write(tmp_path, cfg), out=tmp_path / "o", progress=False))
    a = load_checkpoint(family["a"]).state_dict
    assert out.config.n_layers == 2
    # t = 0 is the first source exactly
    assert torch.allclose(out.state_dict["layers.1.attn.wk.weight"], a["layers.1.attn.wk.weight"])


@pytest.mark.parametrize(
    "slices,method,msg",
    [
        ([[("base", 0, 5)]], "passthrough", "exceeds"),
        ([[("base", 2, 2)]], "passthrough", "0 <= first < end"),
        ([[("base", 0, 2), ("a", 0, 3)]], "linear", "differ in length"),
        ([[("base", 0, 2), ("a", 0, 2)]], "passthrough", "one source per slice"),
        ([[("a", 0, 2), ("b", 0, 2)]], "ties", "needs a base model"),
        ([[]], "passthrough", "at least one source"),
    ],
)
def test_bad_slices_one_line_nothing_written(family, tmp_path, capsys, slices, method, msg):
    entries = [{"sources": [src(family[m], a, b) for m, a, b in sl]} for sl in slices]
    cfg = {"merge_method": method, "out": str(tmp_path / "out"), "slices": entries}
    assert main(["merge", str(write(tmp_path, cfg))]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_models_and_slices_together_refused(family, tmp_path, capsys):
    cfg = {"merge_method": "linear", "out": str(tmp_path / "out"),
           "models": [{"model": str(family["a"])}],
           "slices": [{"sources": [src(family["a"], 0, 4)]}]}  # fmt: skip
    assert main(["merge", str(write(tmp_path, cfg))]) == 2
    assert "not both" in capsys.readouterr().err
