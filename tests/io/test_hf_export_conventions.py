"""Hugging Face export conventions: Qwen2-MoE for a shared expert (gated or always on), sharded
safetensors with an index, the model card's front matter, generation_config.json."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe.cli import main  # noqa: E402
from moe.config import ConfigError, ModelConfig, MoEConfig  # noqa: E402
from moe.io.checkpoint import load_checkpoint, make_meta, save_checkpoint  # noqa: E402
from moe.io.hf import import_hf  # noqa: E402
from moe.io.hf_export import export_hf  # noqa: E402
from moe.io.hf_files import parse_size, read_card  # noqa: E402
from moe.model.transformer import Transformer  # noqa: E402

ATOL = 1e-5


@pytest.fixture
def ids():
    return torch.randint(0, 259, (2, 19), generator=torch.Generator().manual_seed(0))


def _moe_ckpt(path, seed=0, meta=None, **moe):
    cfg = ModelConfig(size="debug", moe=MoEConfig(experts=["text", "code", "dna"], top_k=2, **moe))
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    if model.layers[0].ffn.shared_gate is not None:  # not ~0: make the gate matter
        for layer in model.layers:
            torch.nn.init.normal_(layer.ffn.shared_gate.weight, std=0.5)
    save_checkpoint(path, model.state_dict(), cfg, meta or make_meta(kind="moe"))
    return model


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_shared_expert_exports_as_qwen2_moe_with_our_logits(tmp_path, ids, gated, normalize):
    model = _moe_ckpt(tmp_path / "ck", shared_expert_ffn_dim=24, shared_expert_gate=gated,
                      normalize_weights=normalize)  # fmt: skip
    out = export_hf(tmp_path / "ck", tmp_path / "hf")
    c = json.loads((out / "config.json").read_text())
    assert c["architectures"] == ["Qwen2MoeForCausalLM"] and c["num_experts"] == 3
    assert c["shared_expert_intermediate_size"] == 24 and c["norm_topk_prob"] is normalize
    hf = transformers.Qwen2MoeForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids).logits).abs().max().item()
    print(f"qwen2-moe gated={gated} normalize={normalize}: max |logit diff| {diff:.3g}")
    assert diff <= ATOL
    if not gated:  # always on: gate row 0 (sigmoid = 1/2) and the down projection doubled
        from safetensors.torch import load_file

        w = load_file(str(out / "model.safetensors"))
        assert torch.equal(w["model.layers.0.mlp.shared_expert_gate.weight"], torch.zeros(1, 64))
        ours = model.layers[0].ffn.shared.w2.weight
        assert torch.equal(w["model.layers.0.mlp.shared_expert.down_proj.weight"], 2 * ours)


def test_a_shared_gate_changes_the_function_and_is_checked_against_the_config(tmp_path, ids):
    """The gate is part of the model: scaling it changes the output; a checkpoint whose weights
    lack it for a config that has it is refused naming the field."""
    model = _moe_ckpt(tmp_path / "ck", shared_expert_ffn_dim=24, shared_expert_gate=True)
    with torch.no_grad():
        before = model(ids).logits
        for layer in model.layers:
            layer.ffn.shared_gate.weight.mul_(-1)
        assert (model(ids).logits - before).abs().max() > 1e-4
    sd = {k: v for k, v in model.state_dict().items() if "shared_gate" not in k}
    save_checkpoint(tmp_path / "bad", sd, model.config, make_meta(kind="moe"))
    with pytest.raises(ConfigError, match="shared_expert_gate is true but the weights have no"):
        load_checkpoint(tmp_path / "bad")
    with pytest.raises(ConfigError, match="shared_expert_gate: true needs a shared expert"):
        ModelConfig(moe=MoEConfig(experts=["a"], shared_expert_gate=True)).resolved()


def test_sharding_writes_an_index_and_reloads_identically(tmp_path, ids):
    model = _moe_ckpt(tmp_path / "ck")
    out = export_hf(tmp_path / "ck", tmp_path / "hf", max_shard_size="100KB")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert all(p.stat().st_size <= 100_000 + 10_000 for p in shards)  # + header
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    assert index["metadata"]["total_size"] == total
    hf = transformers.MixtralForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=ATOL)
    # our own import reads the shards back bit for bit
    back = load_checkpoint(import_hf(out, tmp_path / "back")).state_dict
    sd = model.state_dict()
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # one shard (no index) at the default size
    one = export_hf(tmp_path / "ck", tmp_path / "hf1")
    assert (one / "model.safetensors").is_file() and not (one / "model.safetensors.index.json"
                                                          ).exists()  # fmt: skip


def test_model_card_and_generation_config(tmp_path):
    recipe = {"merge_method": "ties", "base_model": "runs/base/model",
              "models": [{"model": "runs/a/model"}, {"model": "runs/b/model"}]}  # fmt: skip
    study = {"arm": "btx", "seed": 0, "bpb": {"text": 1.23}}
    meta = make_meta(kind="merge", recipe=recipe, study=study, parents=["p1", "p2"])
    _moe_ckpt(tmp_path / "ck", meta=meta)
    out = export_hf(tmp_path / "ck", tmp_path / "hf")
    card = read_card(out / "README.md")
    assert card["base_model"] == ["runs/base/model", "runs/a/model", "runs/b/model"]
    assert card["library_name"] == "transformers"
    assert {"moe-forge", "moe", "merge", "mixtral"} <= set(card["tags"])
    assert card["moe_forge"]["merge_config"] == recipe
    assert card["moe_forge"]["study"] == study and card["moe_forge"]["parents"] == ["p1", "p2"]
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (256, 257, 258)
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == 257
    # a model trained here (no merge, no study): no base_model, no merge tag
    cfg = ModelConfig(size="debug")
    save_checkpoint(tmp_path / "dense", Transformer(cfg).state_dict(), cfg, make_meta())
    card = read_card(export_hf(tmp_path / "dense", tmp_path / "hf2") / "README.md")
    assert "base_model" not in card and "merge" not in card["tags"] and "llama" in card["tags"]


def test_a_study_stage_exports_with_its_study_row(tmp_path):
    """A stage of `moe run` (runs/NAME/stages/STAGE/model) carries no study in its meta: the card
    takes its row from the run's results.json (the row whose checkpoint is this model)."""
    run = tmp_path / "study"
    cfg = ModelConfig(size="debug")
    save_checkpoint(run / "stages" / "moe" / "model", Transformer(cfg).state_dict(), cfg,
                    make_meta())
    save_checkpoint(run / "stages" / "seed" / "model", Transformer(cfg).state_dict(), cfg,
                    make_meta())
    models = {"seed": {"label": "seed", "checkpoint": "stages/seed/model", "train_flops": 1e9,
                       "eval": {"text": {"bpb": 3.0}}},
              "moe": {"label": "experts (BTX MoE)", "checkpoint": "stages/moe/model",
                      "train_flops": 4e9, "eval": {"text": {"bpb": 2.5}, "dna": {"bpb": 1.9}}}}
    (run / "results.json").write_text(json.dumps({"name": "study", "seed": 7, "models": models}))
    card = read_card(export_hf(run / "stages" / "moe", tmp_path / "hf") / "README.md")
    row = card["moe_forge"]["study"]
    assert (row["study"], row["seed"], row["model"], row["arm"]) == (
        "study", 7, "moe", "experts (BTX MoE)")
    assert row["bpb"] == {"text": 2.5, "dna": 1.9} and row["train_flops"] == 4e9
    text = (tmp_path / "hf" / "README.md").read_text()
    assert "## Study row" in text
    # outside a study run: no row
    save_checkpoint(tmp_path / "lone", Transformer(cfg).state_dict(), cfg, make_meta())
    card = read_card(export_hf(tmp_path / "lone", tmp_path / "hf2") / "README.md")
    assert "study" not in card["moe_forge"]


@pytest.mark.parametrize("size,want", [("5GB", 5 * 10**9), ("100KB", 100_000),
                                       ("2MiB", 2 * 2**20), (1234, 1234), ("1.5GB", 1_500_000_000)])
def test_parse_size(size, want):
    assert parse_size(size) == want


def test_bad_shard_size_is_one_line_and_writes_nothing(tmp_path, capsys):
    _moe_ckpt(tmp_path / "ck")
    rc = main(["export", str(tmp_path / "ck"), "--out", str(tmp_path / "hf"),
               "--max-shard-size", "lots"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "--max-shard-size" in err
    assert not (tmp_path / "hf").exists()
