"""Merge configs: a section of the wrong shape and a non-finite number fail at load with one line
naming the key and the file (or the override), for every field, found from the schema."""

import typing
from dataclasses import fields, is_dataclass

import pytest

from moe.config import ConfigError
from moe.merge.config import MergeConfig, ModelEntry, load_merge_config, merge_config_from_dict

TWO = "merge_method: linear\nmodels:\n  - model: a\n  - model: b\n"

BAD = [
    (TWO + "parameters: [1, 2]\n", "'parameters' must be a mapping (section), got a list"),
    (TWO + "parameters: 5\n", "'parameters' must be a mapping (section), got 5"),
    (TWO + "parameters: null\n", "'parameters' must be a mapping (section), got null"),
    ("merge_method: linear\nmodels: {a: 1}\n", "'models' must be a list, got a mapping"),
    ("merge_method: linear\nmodels: a\n", "'models' must be a list, got 'a'"),
    ("merge_method: linear\nmodels: [a]\n", "'models[0]' must be a mapping (section), got 'a'"),
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters: [1]\n",
     "'models[0].parameters' must be a mapping (section), got a list"),
    ("merge_method: linear\nmodels: [{model: [a]}]\n",
     "'models[0].model' must be a string, got a list"),
    ("merge_method: [linear]\nmodels: []\n", "'merge_method' must be a string, got a list"),
    (TWO + "parameters: {lambda: [1]}\n", "'parameters.lambda' must be a number, got a list"),
    (TWO + "parameters: {weight: .nan}\n", "parameters.weight must be a finite number, got nan"),
    (TWO + "parameters: {density: .inf}\n", "parameters.density must be a finite number, got inf"),
    (TWO + "parameters: {lambda: .nan}\n", "parameters.lambda must be a finite number, got nan"),
    (TWO + "parameters: {scale: -.inf}\n", "parameters.scale must be a finite number, got -inf"),
    (TWO + "parameters: {t: nan}\n", "parameters.t must be a finite number, got nan"),
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: -.inf}\n",
     "models[0].parameters.weight must be a finite number, got -inf"),
    ("merge_method: ties\nmodels:\n  - model: a\n    parameters: {density: .nan}\n",
     "models[0].parameters.density must be a finite number, got nan"),
]


@pytest.mark.parametrize("text,expect", BAD, ids=[e for _, e in BAD])
def test_merge_yaml_wrong_shape_or_non_finite(tmp_path, text, expect):
    p = tmp_path / "m.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_merge_config(p)
    assert str(e.value) == f"{p}: {expect}"


OVERRIDES = [
    ("parameters=[1]", "'parameters' must be a mapping (section), got a list"),
    ("models=null", "'models' must be a list, got null"),
    ("models.0.model=x", "'models' must be a list, got a mapping"),
    ("parameters.lambda=nan", "parameters.lambda must be a finite number, got nan"),
    ("parameters.t=inf", "parameters.t must be a finite number, got inf"),
    ("parameters.weight=-inf", "parameters.weight must be a finite number, got -inf"),
]


@pytest.mark.parametrize("ov,expect", OVERRIDES, ids=[o for o, _ in OVERRIDES])
def test_merge_override_wrong_shape_or_non_finite(tmp_path, ov, expect):
    p = tmp_path / "m.yaml"
    p.write_text(TWO)
    with pytest.raises(ConfigError) as e:
        load_merge_config(p, [ov])
    assert str(e.value) == f"override {ov!r}: {expect}"


def test_file_checked_before_an_override_is_merged_onto_it(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text(TWO + "parameters: [1]\n")
    with pytest.raises(ConfigError, match=r"m.yaml: 'parameters' must be a mapping \(section\)"):
        load_merge_config(p, ["parameters.t=0.5"])


def test_from_dict_and_interpolated_non_finite():
    with pytest.raises(ConfigError) as e:
        merge_config_from_dict(
            {"merge_method": "linear", "models": [{"model": "a"}], "parameters": {"lambda": 1e999}}
        )
    assert str(e.value) == "merge config: parameters.lambda must be a finite number, got inf"
    with pytest.raises(ConfigError) as e:
        merge_config_from_dict(
            {"merge_method": "slerp", "models": [{"model": "a"}, {"model": "b"}],
             "parameters": {"t": "${oc.decode:'nan'}"}}
        )  # fmt: skip
    assert str(e.value) == "merge config: parameters.t must be a finite number, got nan"


def _float_keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        tp, name = hints[f.name], f.metadata.get("yaml", f.name)
        if is_dataclass(tp):
            yield from _float_keys(tp, f"{prefix}{name}.")
        elif tp is float or tp == (float | None) or tp is typing.Any:  # Any: gradient forms
            yield f"{prefix}{name}"


@pytest.mark.parametrize("value,got", [(".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf")])
def test_every_float_field_rejects_non_finite(tmp_path, value, got):
    """Generic: each float field (global and per-model parameters) refuses nan and ±inf."""
    keys = list(_float_keys(MergeConfig)) + [
        f"models[0].{k}" for k in _float_keys(ModelEntry)
    ]
    assert {"parameters.lambda", "parameters.t", "models[0].parameters.weight"} <= set(keys)
    for key in keys:
        parts = key.replace("models[0]", "models_0").split(".")
        leaf = f"{{{parts[-1]}: {value}}}"
        if parts[0] == "models_0":
            text = f"merge_method: linear\nmodels:\n  - model: a\n    {parts[1]}: {leaf}\n"
        else:
            text = f"merge_method: linear\nmodels:\n  - model: a\n{parts[0]}: {leaf}\n"
        p = tmp_path / "m.yaml"
        p.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_merge_config(p)
        assert str(e.value) == f"{p}: {key} must be a finite number, got {got}"
