import pytest

from moe.config import ConfigError, ModelConfig, load_recipe


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_interpolation_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", "model:\n  size: tiny\ndata:\n  seq_len: 64\n")
    p = write(tmp_path, "r.yaml", "defaults: [base.yaml]\nname: exp\ndata:\n  batch_size: 3\n")
    r = load_recipe(p, ["trainer.max_steps=7", "data.domains=[code]"])
    assert r.model.size == "tiny" and r.data.seq_len == 64 and r.data.batch_size == 3
    assert r.trainer.max_steps == 7 and r.data.domains == ["code"]
    assert r.out_dir == "runs/exp"


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    p = write(tmp_path, "r.yaml", "model:\n  dimm: 3\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "r.yaml" in msg and "model.dimm" in msg and "model.dim" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("key,want", [
    ("optim.learning_rate", "optim.lr"),               # another framework's name for the key
    ("model.hidden_size", "model.dim"),
    ("model.num_key_value_heads", "model.n_kv_heads"),
    ("trainer.max_epochs", "trainer.max_steps"),
    ("model.moe.num_experts_per_tok", "model.moe.top_k"),
    ("optim.lrr", "optim.lr"),                         # a misspelling
])  # fmt: skip
def test_unknown_key_suggests_our_name_for_it(tmp_path, key, want):
    p = write(tmp_path, "r.yaml", "name: x\n")
    with pytest.raises(ConfigError, match=rf"did you mean '{want}'\?"):
        load_recipe(p, [f"{key}=1"])


def test_wrong_type(tmp_path):
    p = write(tmp_path, "r.yaml", "trainer:\n  max_steps: lots\n")
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        load_recipe(p)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_recipe("/nonexistent/recipe.yaml")


def test_bad_yaml(tmp_path):
    p = write(tmp_path, "r.yaml", "model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(p)


def test_unknown_domain_and_seq_len_too_long():
    with pytest.raises(ConfigError, match="unknown domain 'klingon'"):
        load_recipe(None, ["data.domains=[klingon]"])
    with pytest.raises(ConfigError, match="larger than the model's context"):
        load_recipe(None, ["data.seq_len=4096"])


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe(None, ["trainer.max_steps"])


def test_defaults_cycle(tmp_path):
    write(tmp_path, "a.yaml", "defaults: [b.yaml]\n")
    write(tmp_path, "b.yaml", "defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_size_presets_and_explicit_fields():
    c = ModelConfig(size="tiny", dim=96, n_heads=4, n_kv_heads=4).resolved()
    assert c.dim == 96 and c.n_layers == 4
    with pytest.raises(ConfigError, match="unknown size"):
        ModelConfig(size="huge").resolved()


def test_topk_out_of_range():
    with pytest.raises(ConfigError, match="top_k"):
        load_recipe(
            None,
            [
                "model.moe.experts=[a,b]",
                "model.moe.top_k=3",
                "data.sources.a.kind=files",
                "data.sources.a.paths=[x]",
                "data.sources.b.kind=files",
                "data.sources.b.paths=[x]",
            ],
        )


# ---------------------------------------------------------------- shapes and non-finite numbers

BAD_FILES = [
    ("model: [1, 2]\n", "'model' must be a mapping (section), got a list"),
    ("data: 5\n", "'data' must be a mapping (section), got 5"),
    ("data: null\n", "'data' must be a mapping (section), got null"),
    ("model:\n  moe: [1]\n", "'model.moe' must be a mapping (section), got a list"),
    ("data:\n  domains: {text: 1}\n", "'data.domains' must be a list, got a mapping"),
    ("data:\n  domains: [[text]]\n", "'data.domains[0]' must be a string, got a list"),
    ("data:\n  sources: [1]\n", "'data.sources' must be a mapping, got a list"),
    ("data: {sources: {text: [1]}}", "'data.sources.text' must be a mapping (section), got a list"),
    ("data:\n  weights: [1]\n", "'data.weights' must be a mapping, got a list"),
    ("data:\n  weights:\n    text: [1]\n", "'data.weights.text' must be a number, got a list"),
    ("optim:\n  lr: [0.1]\n", "'optim.lr' must be a number, got a list"),
    ("name: {a: 1}\n", "'name' must be a string, got a mapping"),
    ("optim:\n  lr: .nan\n", "optim.lr must be a finite number, got nan"),
    ("optim:\n  lr: .inf\n", "optim.lr must be a finite number, got inf"),
    ("optim:\n  lr: -.inf\n", "optim.lr must be a finite number, got -inf"),
    ("optim:\n  lr: nan\n", "optim.lr must be a finite number, got nan"),
    ("model:\n  rope_theta: 1e999\n", "model.rope_theta must be a finite number, got inf"),
    ("data:\n  weights: {text: .nan}\n", "data.weights.text must be a finite number, got nan"),
    ("trainer:\n  devices: .nan\n", "trainer.devices must be a finite number, got nan"),
    ("optim:\n  lr: ${optim.eps}\n  eps: .inf\n", "optim.eps must be a finite number, got inf"),
]


@pytest.mark.parametrize("text,expect", BAD_FILES, ids=[t for t, _ in BAD_FILES])
def test_wrong_shape_or_non_finite_in_file(tmp_path, text, expect):
    p = write(tmp_path, "r.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    assert str(e.value) == f"{p}: {expect}"


def test_shape_checked_in_defaults_and_against_earlier_layers(tmp_path):
    write(tmp_path, "base.yaml", "trainer:\n  devices: [0]\noptim:\n  beta2: .nan\n")
    p = write(tmp_path, "r.yaml", "defaults: [base.yaml]\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    assert str(e.value) == f"{tmp_path / 'base.yaml'}: optim.beta2 must be a finite number, got nan"
    write(tmp_path, "base.yaml", "trainer:\n  devices: [0]\n")
    p = write(tmp_path, "r.yaml", "defaults: [base.yaml]\ntrainer:\n  devices: {a: 1}\n")
    with pytest.raises(ConfigError, match=r"r.yaml: 'trainer.devices' must be a list like its "):
        load_recipe(p)


BAD_OVERRIDES = [
    ("model=[1,2]", "'model' must be a mapping (section), got a list"),
    ("data=5", "'data' must be a mapping (section), got 5"),
    ("model.moe=null", "'model.moe' must be a mapping (section), got null"),
    ("data.domains={text: 1}", "'data.domains' must be a list, got a mapping"),
    ("data.sources.text=5", "'data.sources.text' must be a mapping (section), got 5"),
    ("optim.lr=[1]", "'optim.lr' must be a number, got a list"),
    ("optim.lr=nan", "optim.lr must be a finite number, got nan"),
    ("optim.lr=.nan", "optim.lr must be a finite number, got nan"),
    ("optim.lr=inf", "optim.lr must be a finite number, got inf"),
    ("optim.lr=-inf", "optim.lr must be a finite number, got -inf"),
    ("data.weights={text: .nan}", "data.weights.text must be a finite number, got nan"),
    ("data.weights.code=inf", "data.weights.code must be a finite number, got inf"),
    ("study.merge_density=nan", "study.merge_density must be a finite number, got nan"),
]


@pytest.mark.parametrize("ov,expect", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_wrong_shape_or_non_finite_override(ov, expect):
    with pytest.raises(ConfigError) as e:
        load_recipe(None, [ov])
    assert str(e.value) == f"override {ov!r}: {expect}"


def test_override_list_then_mapping_on_untyped_field():
    with pytest.raises(ConfigError) as e:
        load_recipe(None, ["trainer.devices=[0]", "trainer.devices={a: 1}"])
    assert str(e.value) == (
        "override 'trainer.devices={a: 1}': 'trainer.devices' must be a list like its earlier "
        "value (a list and a mapping do not merge), got a mapping"
    )
    assert load_recipe(None, ["trainer.devices=[0]", "trainer.devices=2"]).trainer.devices == 2


def test_every_float_field_rejects_nan():
    """Generic: each float field of every section (found from the schema) refuses nan."""
    import typing
    from dataclasses import fields, is_dataclass

    from moe.config import Recipe

    def float_keys(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            tp = hints[f.name]
            if is_dataclass(tp):
                yield from float_keys(tp, f"{prefix}{f.name}.")
            elif tp is float or tp == (float | None):
                yield f"{prefix}{f.name}"

    keys = list(float_keys(Recipe))
    assert "optim.lr" in keys and "model.moe.jitter" in keys
    for key in keys:
        with pytest.raises(ConfigError, match=rf"{key} must be a finite number, got nan"):
            load_recipe(None, [f"{key}=nan"])
