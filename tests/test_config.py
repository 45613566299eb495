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
