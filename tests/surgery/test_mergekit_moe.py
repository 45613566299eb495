"""`moe assemble CONFIG.yaml`: mergekit-moe configs over tiny Hugging Face Llama fine-tunes of one
base (their FFNs perturbed), built locally. The outputs load in transformers and compute our
model's logits; gate rows equal hand computations from transformers' own hidden states."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from moe.cli import main  # noqa: E402
from moe.io.checkpoint import load_model, read_meta  # noqa: E402
from moe.io.hf import import_hf, read_hf  # noqa: E402
from moe.io.hf_files import read_card  # noqa: E402
from moe.model.transformer import Transformer  # noqa: E402
from moe.surgery.mergekit_moe import build_moe, lineage_distance, load_moe_config  # noqa: E402

ATOL = 1e-5
PROMPTS = [(["def f(x):", "import os"], ["the cat"]), (["Once upon a time", "the cat"], []),
           (["ACGTACGT", "GATTACA"], [])]  # fmt: skip


def _cfg():
    return transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=259, max_position_embeddings=128,
    )  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base, three fine-tunes of it (FFN weights moved), an unrelated model of the same shape."""
    root = tmp_path_factory.mktemp("mk")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(_cfg()).eval()
    base.save_pretrained(root / "base")
    for i in range(3):
        m = transformers.LlamaForCausalLM(_cfg())
        m.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if ".mlp." in n:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        m.save_pretrained(root / f"ft{i}")
    torch.manual_seed(123)
    transformers.LlamaForCausalLM(_cfg()).save_pretrained(root / "other")
    return root


def _write(path, base, experts, gate_mode="hidden", shared=None, **extra):
    c = {"base_model": str(base), "gate_mode": gate_mode, "dtype": "float32",
         "experts_per_token": 2, **extra,
         "experts": [{"source_model": str(src), "positive_prompts": pos,
                      **({"negative_prompts": neg} if neg else {})}
                     for src, (pos, neg) in zip(experts, PROMPTS)]}  # fmt: skip
    if shared is not None:
        c["shared_experts"] = [shared]
    path.write_text(yaml.safe_dump(c, sort_keys=False))
    return path


def _ids():
    return torch.randint(0, 259, (2, 21), generator=torch.Generator().manual_seed(0))


def _hand_hidden(hf_base, prompts):
    """Mean over prompts of transformers' hidden_states[l] (the input of layer l) at the last
    token of BOS + prompt: (layers, D)."""
    rows = []
    for p in prompts:
        ids = torch.tensor([[256] + list(p.encode())])
        with torch.no_grad():
            hs = hf_base(ids, output_hidden_states=True).hidden_states[:-1]
        rows.append(torch.stack([h[0, -1] for h in hs]).double())
    return torch.stack(rows).mean(0)


def _unit(v):
    return v / v.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("mode", ["hidden", "cheap_embed", "random"])
def test_assembled_mixtral_loads_and_matches_our_logits(models, tmp_path, mode, capsys):
    experts = [models / f"ft{i}" for i in range(3)]
    cfg = _write(tmp_path / "moe.yaml", models / "base", experts, mode)
    out = tmp_path / "out"
    assert main(["assemble", str(cfg), "--out", str(out)]) == 0
    c = json.loads((out / "config.json").read_text())
    assert c["architectures"] == ["MixtralForCausalLM"] and c["num_local_experts"] == 3
    assert c["num_experts_per_tok"] == 2
    a = build_moe(load_moe_config(cfg))
    ours = Transformer.from_state(a.config, a.state).eval()
    hf = transformers.MixtralForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        diff = (hf(_ids()).logits - ours(_ids()).logits).abs().max().item()
    with capsys.disabled():
        print(f"\nmergekit-moe {mode} → Mixtral: max |logit diff| vs ours {diff:.3g}")
    assert diff <= ATOL
    # each expert's FFN is its source model's, bit for bit; attention and norms the base's
    w = load_file(str(out / "model.safetensors"))
    ft1 = load_file(str(models / "ft1" / "model.safetensors"))
    base = load_file(str(models / "base" / "model.safetensors"))
    pre = "model.layers.1.block_sparse_moe.experts.1"
    assert torch.equal(w[f"{pre}.w1.weight"], ft1["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(w[f"{pre}.w2.weight"], ft1["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(w["model.layers.1.self_attn.q_proj.weight"],
                       base["model.layers.1.self_attn.q_proj.weight"])  # fmt: skip
    gates = torch.stack([w[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in range(2)])
    hf_base = transformers.LlamaForCausalLM.from_pretrained(models / "base").eval()
    if mode == "hidden":  # hand computation from transformers' hidden states
        want = torch.stack([_unit(_hand_hidden(hf_base, pos) - (_hand_hidden(hf_base, neg)
                            if neg else 0)) for pos, neg in PROMPTS], dim=1)  # fmt: skip
        torch.testing.assert_close(gates.double(), want, rtol=0, atol=1e-5)
    elif mode == "cheap_embed":
        emb = hf_base.model.embed_tokens.weight.detach().double()

        def e(ps):
            return _unit(sum(emb[[256] + list(p.encode())].sum(0) for p in ps))

        want = torch.stack([_unit(e(pos) - (e(neg) if neg else 0)) for pos, neg in PROMPTS])
        for layer in range(2):
            torch.testing.assert_close(gates[layer].double(), want, rtol=0, atol=1e-6)
    else:  # seeded standard normal rows: the same seed gives the same rows, another seed others
        again = build_moe(load_moe_config(cfg), seed=0).state["layers.0.ffn.router.weight"]
        other = build_moe(load_moe_config(cfg), seed=1).state["layers.0.ffn.router.weight"]
        assert torch.equal(gates[0], again) and not torch.equal(again, other)
        assert 0.5 < gates.std().item() < 1.5
    card = read_card(out / "README.md")
    assert card["base_model"][0] == str(models / "base")
    assert card["moe_forge"]["assembly_config"]["gate_mode"] == mode


def test_shared_expert_assembles_as_qwen2_moe(models, tmp_path, capsys):
    shared = {"source_model": str(models / "ft2"), "positive_prompts": ["shared knowledge"],
              "residual_scale": 0.5}  # fmt: skip
    cfg = _write(tmp_path / "moe.yaml", models / "base", [models / "ft0", models / "ft1"],
                 shared=shared)  # fmt: skip
    out = tmp_path / "out"
    assert main(["assemble", str(cfg), "--out", str(out)]) == 0
    c = json.loads((out / "config.json").read_text())
    assert c["architectures"] == ["Qwen2MoeForCausalLM"] and c["num_experts"] == 2
    a = build_moe(load_moe_config(cfg))
    assert a.config.moe.shared_expert_gate
    ours = Transformer.from_state(a.config, a.state).eval()
    hf = transformers.Qwen2MoeForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        diff = (hf(_ids()).logits - ours(_ids()).logits).abs().max().item()
    with capsys.disabled():
        print(f"\nmergekit-moe shared expert → Qwen2-MoE: max |logit diff| vs ours {diff:.3g}")
    assert diff <= ATOL
    w = load_file(str(out / "model.safetensors"))
    ft2 = load_file(str(models / "ft2" / "model.safetensors"))
    torch.testing.assert_close(w["model.layers.0.mlp.shared_expert.down_proj.weight"],
                               0.5 * ft2["model.layers.0.mlp.down_proj.weight"], rtol=0, atol=0)
    hf_base = transformers.LlamaForCausalLM.from_pretrained(models / "base").eval()
    want = _unit(_hand_hidden(hf_base, ["shared knowledge"]))  # (layers, D)
    got = torch.stack([w[f"model.layers.{i}.mlp.shared_expert_gate.weight"][0] for i in range(2)])
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_moe_forge_checkpoints_give_a_checkpoint_and_its_export(models, tmp_path):
    for name in ("base", "ft0", "ft1", "ft2"):
        import_hf(models / name, tmp_path / name)
    cfg = _write(tmp_path / "moe.yaml", tmp_path / "base", [tmp_path / f"ft{i}" for i in range(3)])
    out, hf_out = tmp_path / "moe", tmp_path / "moe-hf"
    assert main(["assemble", str(cfg), "--out", str(out), "--hf-out", str(hf_out)]) == 0
    meta = read_meta(out)
    ids = {read_meta(tmp_path / n)["id"] for n in ("base", "ft0", "ft1", "ft2")}
    assert meta["kind"] == "moe" and set(meta["parents"]) == ids
    assert meta["assembled"]["method"] == "mergekit-moe"
    assert meta["assembled"]["lineage_distance"] == {f"experts[{i}]": 0.0 for i in range(3)}
    ours = load_model(out).model.eval()
    hf = transformers.MixtralForCausalLM.from_pretrained(hf_out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(_ids()).logits, ours(_ids()).logits, rtol=0, atol=ATOL)


def test_lineage_is_measured_on_the_weights(models):
    base = read_hf(models / "base")[2]
    assert lineage_distance(base, read_hf(models / "ft0")[2])[0] == 0.0  # only FFNs moved
    d_other, where = lineage_distance(base, read_hf(models / "other")[2])
    assert 1.3 < d_other < 1.5 and where  # unrelated weights: about sqrt(2) of the norm away
    # a full fine-tune also moves attention: 2% of each matrix's norm, well inside the tolerance
    g = torch.Generator().manual_seed(0)
    moved = {}
    for k, v in base.items():
        noise = torch.randn(v.shape, generator=g)
        moved[k] = v + 0.02 * v.norm() / noise.norm() * noise if v.dim() == 2 else v
    d, _ = lineage_distance(base, moved)
    assert d == pytest.approx(0.02, rel=1e-4)


def _refused(capsys, tmp_path, argv, match):
    before = {p.name for p in tmp_path.iterdir()}
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("moe: error:") and "\n" not in err and match in err, err
    assert {p.name for p in tmp_path.iterdir()} == before  # nothing written, nothing staged
    return err


def test_experts_of_another_base_are_refused(models, tmp_path, capsys):
    cfg = _write(tmp_path / "moe.yaml", models / "base", [models / "ft0", models / "other"])
    err = _refused(capsys, tmp_path, ["assemble", str(cfg), "--out", str(tmp_path / "o")],
                   "is not a fine-tune of base_model")  # fmt: skip
    assert "experts[1]" in err and "lineage_tolerance" in err


@pytest.mark.parametrize("edit,match", [
    (lambda c: c["experts"][0].update(positive_prompts=["ok", ""]), "tokenizes to nothing"),
    (lambda c: c["experts"][1].pop("positive_prompts"), "experts[1].positive_prompts"),
    (lambda c: c.update(gate_mode="smart"), "gate_mode"),
    (lambda c: c.update(experts_per_token=5), "experts_per_token"),
    (lambda c: c.update(colour="red"), "colour: unknown key"),
    (lambda c: c["experts"][0].update(source_model="/nonexistent/m"), "hub names are not"),
    (lambda c: c.update(architecture="mixtral",
                        shared_experts=[{"source_model": c["base_model"]}]), "no shared expert"),
])  # fmt: skip
def test_bad_configs_are_one_line_errors(models, tmp_path, capsys, edit, match):
    cfg = _write(tmp_path / "moe.yaml", models / "base", [models / "ft0", models / "ft1"])
    c = yaml.safe_load(cfg.read_text())
    edit(c)
    cfg.write_text(yaml.safe_dump(c))
    _refused(capsys, tmp_path, ["assemble", str(cfg), "--out", str(tmp_path / "o")], match)


def test_branch_options_do_not_mix_with_a_config(models, tmp_path, capsys):
    cfg = _write(tmp_path / "moe.yaml", models / "base", [models / "ft0", models / "ft1"])
    _refused(capsys, tmp_path, ["assemble", str(cfg), "--out", str(tmp_path / "o"),
                                "--top-k", "1"], "--top-k belongs to assembling branches")


def test_a_prompt_the_tokenizer_reduces_to_nothing_is_refused(tmp_path):
    """With a word-level tokenizer, whitespace alone is no token: a one-line error naming it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from moe.config import ConfigError, ModelConfig
    from moe.data.tokenizer import HFTokenizer
    from moe.surgery.mergekit_moe import gate_rows

    tok = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "hello": 2, "[UNK]": 3}, "[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    hf_tok = HFTokenizer(tmp_path)
    model = Transformer(ModelConfig(size="debug", vocab_size=4))
    assert gate_rows(model, hf_tok, [(["hello"], [])], "hidden", ["e"]).shape == (2, 1, 64)
    with pytest.raises(ConfigError, match=r"e\.positive_prompts\[1\]: '   ' tokenizes to no"):
        gate_rows(model, hf_tok, [(["hello", "   "], [])], "hidden", ["e"])
