"""mergekit's parameter forms (moe/merge/gradients.py): a number, a gradient over the layers, or
{filter, value} entries; resolved per tensor in `models:` and `slices:` merges."""

import pytest
import torch
from test_merge import _cfg, dense_family  # noqa: F401  (the fixture)

from moe.config import ConfigError
from moe.io.checkpoint import load_checkpoint
from moe.merge import merge, merge_config_from_dict
from moe.merge.gradients import position, value_at

FILTERED = [{"filter": "self_attn", "value": [0, 0.5, 1]},  # a Hugging Face name part
            {"filter": "ffn", "value": [1, 0]},  # one of ours
            {"value": 0.3}]


def test_values_hand_computed():
    assert value_at(0.7, "layers.0.attn.wq.weight", 0.9) == 0.7
    assert value_at([0, 1], "x", 0.25) == 0.25
    assert value_at([0, 0.5, 1, 0.5, 0], "x", 0.375) == pytest.approx(0.75)  # between anchors 1, 2
    assert value_at([0, 0.5, 1, 0.5, 0], "x", 1.0) == 0.0
    assert value_at(FILTERED, "layers.1.attn.wq.weight", 0.25) == 0.25  # self_attn.q_proj
    assert value_at(FILTERED, "layers.1.ffn.w2.weight", 0.25) == 0.75
    assert value_at(FILTERED, "layers.1.attn_norm.weight", 0.25) == 0.3  # input_layernorm
    assert value_at([{"filter": "mlp", "value": 1}], "tok_emb.weight", 0.0, 0.5) == 0.5
    assert value_at(None, "x", 0.0, 0.5) == 0.5


def test_positions():
    assert position("layers.0.attn.wq.weight", 0, 4) == 0.0
    assert position("layers.3.ffn.w1.weight", 0, 4) == 1.0
    assert position("layers.5.ffn.w1.weight", 4, 3) == 0.5  # the second of a slice of 3
    assert position("tok_emb.weight", 0, 4) == 0.0
    assert position("norm.weight", 0, 4) == position("lm_head.weight", 0, 4) == 1.0
    assert position("model.layers.1.mlp.up_proj.weight", 0, 3) == 0.5  # a HF directory's name
    assert position("layers.0.ffn.w1.weight", 0, 1) == 0.0


def test_weight_gradients_pick_each_model_per_layer(dense_family, tmp_path):  # noqa: F811
    """Linear merge, model a weighted [1, 0] and model b [0, 1] over a 2-layer model: layer 0
    and the embedding are a's, layer 1 and the final norm/head b's, exactly."""
    _, (a, b), _ = dense_family
    cfg = merge_config_from_dict({"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": [1, 0]}},
        {"model": str(b), "parameters": {"weight": [0, 1]}}]})
    got = load_checkpoint(merge(cfg, tmp_path / "out", progress=False)).state_dict
    sa, sb = load_checkpoint(a).state_dict, load_checkpoint(b).state_dict
    for k, v in got.items():
        want = sb[k] if k.startswith(("layers.1.", "norm.", "lm_head.")) else sa[k]
        assert torch.equal(v, want), k


def test_slerp_with_filtered_t_equals_per_tensor_slerp(dense_family, tmp_path):  # noqa: F811
    _, (a, b), _ = dense_family
    t = [{"filter": "self_attn", "value": [0.2, 0.8]}, {"filter": "mlp", "value": 0.9},
         {"value": 0.5}]
    got = load_checkpoint(merge(_cfg("slerp", [a, b], parameters={"t": t}), tmp_path / "g",
                                progress=False)).state_dict
    for k in ("layers.0.attn.wq.weight", "layers.1.attn.wq.weight", "layers.1.ffn.w1.weight",
              "tok_emb.weight"):
        tk = {"layers.0.attn.wq.weight": 0.2, "layers.1.attn.wq.weight": 0.8,
              "layers.1.ffn.w1.weight": 0.9, "tok_emb.weight": 0.5}[k]
        one = load_checkpoint(merge(_cfg("slerp", [a, b], parameters={"t": tk}),
                                    tmp_path / f"t{tk}", progress=False, overwrite=True)).state_dict
        assert torch.equal(got[k], one[k]), k


def test_a_gradient_runs_over_each_slice(dense_family, tmp_path):  # noqa: F811
    """Two slices of both layers each (4 output layers): within each slice the first layer is
    a's, the second b's (weights [1, 0] and [0, 1] run over the slice)."""
    _, (a, b), _ = dense_family
    src = [{"model": str(a), "layer_range": [0, 2], "parameters": {"weight": [1, 0]}},
           {"model": str(b), "layer_range": [0, 2], "parameters": {"weight": [0, 1]}}]
    cfg = merge_config_from_dict({"merge_method": "linear", "slices": [{"sources": src}] * 2})
    got = load_checkpoint(merge(cfg, tmp_path / "out", progress=False)).state_dict
    sa, sb = load_checkpoint(a).state_dict, load_checkpoint(b).state_dict
    for j, (want, layer) in enumerate([(sa, 0), (sb, 1), (sa, 0), (sb, 1)]):
        for suf in ("attn.wq.weight", "ffn.w2.weight"):
            assert torch.equal(got[f"layers.{j}.{suf}"], want[f"layers.{layer}.{suf}"]), (j, suf)


@pytest.mark.parametrize("params, msg", [
    ({"t": [0, 2]}, r"parameters.t must be in \[0, 1\], got 2"),
    ({"t": []}, "parameters.t: an empty list"),
    ({"t": [{"filt": "mlp", "value": 1}]}, r"parameters.t\[0\]: a gradient lists numbers only"),
    ({"t": [{"filter": 3, "value": 1}]}, r"parameters.t\[0\].filter must be a string"),
    ({"t": "half"}, "a number, a list of numbers"),
])
def test_bad_forms_are_one_line_errors(dense_family, params, msg):  # noqa: F811
    _, (a, b), _ = dense_family
    with pytest.raises(ConfigError, match=msg):
        _cfg("slerp", [a, b], parameters=params)


def test_density_gradient_needs_a_method_that_uses_density(dense_family):  # noqa: F811
    base, (a, b), _ = dense_family
    with pytest.raises(ConfigError, match="linear does not use density"):
        _cfg("linear", [a, b], parameters={"density": [1, 0.5]})
    _cfg("ties", [a, b], base, parameters={"density": [1, 0.5]})  # accepted
