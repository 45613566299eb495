"""mergekit's own YAML, unchanged, over tiny Hugging Face Llama directories (moe/merge/mergekit.py,
moe/merge/vocab.py, moe/merge/slices.py): the output's layout is the inputs', it loads in
transformers, its logits equal a model built from a hand merge of the inputs' tensors (float64
references written here, not the library's methods), its tokenizer is the one named and its
dtype the one asked for. Bad input: exit 2, one line, nothing written."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from moe.cli import main  # noqa: E402
from moe.io.checkpoint import load_checkpoint  # noqa: E402
from moe.io.hf import import_hf  # noqa: E402

pytestmark = pytest.mark.slow

LAYERS = 4


def _tok_b(a, out):
    """Tokenizer B from A: the last 6 merges (and the tokens they make) removed, the remaining
    learned tokens renumbered in reverse order: B lacks 6 of A's tokens and numbers the others
    differently."""
    d = json.loads((a / "tokenizer.json").read_text())
    special = {t["content"] for t in d["added_tokens"]}
    merges = d["model"]["merges"]
    gone = {("".join(m) if isinstance(m, list) else m.replace(" ", "")) for m in merges[-6:]}
    d["model"]["merges"] = merges[:-6]
    vocab = {t: i for t, i in d["model"]["vocab"].items() if t not in gone}
    fixed = sorted((i, t) for t, i in vocab.items() if t in special)
    learned = [t for _, t in sorted((i, t) for t, i in vocab.items() if t not in special)]
    new = {t: i for i, t in enumerate(reversed(learned))}
    for _, t in fixed:
        new[t] = len(new)
    d["model"]["vocab"] = new
    for t in d["added_tokens"]:
        t["id"] = new[t["content"]]
    out.mkdir()
    (out / "tokenizer.json").write_text(json.dumps(d))
    (out / "tokenizer_config.json").write_text((a / "tokenizer_config.json").read_text())
    return out, len(new)


def _llama(path, vocab, seed, like=None, tok=None):
    """A tiny random Llama directory (or `like`'s weights plus noise) with tokenizer `tok`."""
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if like is not None:
        g = torch.Generator().manual_seed(seed)
        sd = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in like.items()
              if v.shape[0] == vocab or "embed" not in k and "lm_head" not in k}
        model.load_state_dict(sd, strict=False)
    model.save_pretrained(path)
    for f in tok.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from tokenizer_fixtures import bpe_tokenizer

    root = tmp_path_factory.mktemp("mk")
    tok_a = bpe_tokenizer(root / "tok_a", vocab_size=300)
    n_a = json.loads((tok_a / "tokenizer.json").read_text())
    n_a = len(n_a["model"]["vocab"])
    tok_b, n_b = _tok_b(tok_a, root / "tok_b")
    sd = {}
    sd["base"] = _llama(root / "base", n_a, 0, tok=tok_a)
    sd["ft1"] = _llama(root / "ft1", n_a, 1, like=sd["base"], tok=tok_a)
    sd["ft2"] = _llama(root / "ft2", n_b, 2, like=sd["base"], tok=tok_b)
    return root, sd


def _ids():
    return torch.randint(0, 200, (2, 13), generator=torch.Generator().manual_seed(0))


def _run(tmp_path, cfg, out="out"):
    """`moe merge CONFIG --out DIR` on the YAML text as a mergekit user writes it."""
    p = tmp_path / "config.yaml"
    p.write_text(cfg)
    assert main(["merge", str(p), "--out", str(tmp_path / out)]) == 0
    return tmp_path / out


def _logits(model_or_dir, sd=None, n_layers=LAYERS, vocab=None):
    """Logits of a saved directory, or of a Llama built from state dict `sd` (float32)."""
    if sd is None:
        m = transformers.AutoModelForCausalLM.from_pretrained(model_or_dir).float().eval()
    else:
        cfg = transformers.AutoConfig.from_pretrained(model_or_dir)
        cfg.num_hidden_layers, cfg.vocab_size = n_layers, vocab or cfg.vocab_size
        m = transformers.LlamaForCausalLM(cfg).eval()
        m.load_state_dict({k: v.float() for k, v in sd.items()})
    with torch.no_grad():
        return m(_ids()).logits


def _max_diff(a, b):
    return float((a - b).abs().max())


def _layout(d):
    return sorted(f.name for f in d.iterdir() if f.suffix in (".json", ".safetensors"))


def test_linear_models(hf, tmp_path):
    root, sd = hf
    out = _run(tmp_path, f"""
models:
  - model: {root}/base
    parameters:
      weight: 0.3
  - model: {root}/ft1
    parameters:
      weight: 0.7
merge_method: linear
dtype: float32
""")
    assert _layout(out) == _layout(root / "base")  # config, generation config, weights, tokenizer
    want = {k: (0.3 * sd["base"][k].double() + 0.7 * sd["ft1"][k].double()) / 1.0
            for k in sd["base"]}  # fmt: skip
    diff = _max_diff(_logits(out), _logits(out, want))
    print(f"linear: max |logit - hand| = {diff:.3g}")
    assert diff < 1e-5
    assert (out / "tokenizer.json").read_bytes() == (root / "base" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("layout", ["hf", "moe"])
def test_passthrough_slices_frankenmerge(hf, tmp_path, layout):
    """SOLAR-style stacking of base layers 0-1 and ft1 layers 1-3: 5 layers, each the chosen
    source layer exactly; HF in -> HF out, moe-forge in -> moe-forge out."""
    root, sd = hf
    src = {m: root / m for m in ("base", "ft1")}
    if layout == "moe":
        src = {m: import_hf(root / m, tmp_path / f"ck-{m}") for m in src}
    out = _run(tmp_path, f"""
slices:
  - sources:
      - model: {src['base']}
        layer_range: [0, 2]
  - sources:
      - model: {src['ft1']}
        layer_range: [1, 4]
merge_method: passthrough
dtype: float32
""")
    plan = [("base", 0), ("base", 1), ("ft1", 1), ("ft1", 2), ("ft1", 3)]
    want = {k: v for k, v in sd["base"].items() if ".layers." not in k}
    for j, (m, i) in enumerate(plan):
        for k, v in sd[m].items():
            if k.startswith(f"model.layers.{i}."):
                want[k.replace(f"layers.{i}.", f"layers.{j}.", 1)] = v
    if layout == "moe":  # a moe-forge checkpoint, with the inputs' tokenizer
        ck = load_checkpoint(out)
        assert ck.config.n_layers == 5 and (out / "tokenizer" / "tokenizer.json").is_file()
        from moe.io.hf_export import export_hf

        out = export_hf(out, tmp_path / "exported")
    else:
        assert _layout(out) == _layout(root / "base")
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
    got = transformers.AutoModelForCausalLM.from_pretrained(out).eval().state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)  # bit for bit
    diff = _max_diff(_logits(out), _logits(root / "base", want, n_layers=5))
    print(f"passthrough ({layout}): max |logit - hand| = {diff:.3g}")
    assert diff == 0.0


def _slerp(t, a, b):
    """float64 reference: sin((1-t)Ω)/sin Ω a + sin(tΩ)/sin Ω b; linear when |cos Ω| > 0.9995."""
    a, b = a.double(), b.double()
    cos = float((a.flatten() @ b.flatten()) / (a.norm() * b.norm()))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    om = math.acos(cos)
    return (math.sin((1 - t) * om) * a + math.sin(t * om) * b) / math.sin(om)


def test_slerp_filtered_t_over_slices(hf, tmp_path):
    root, sd = hf
    out = _run(tmp_path, f"""
slices:
  - sources:
      - model: {root}/base
        layer_range: [0, 4]
      - model: {root}/ft1
        layer_range: [0, 4]
merge_method: slerp
base_model: {root}/base
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""")
    assert _layout(out) == _layout(root / "base")
    want = {}
    for k in sd["base"]:
        if "self_attn" in k or "mlp" in k:
            i = int(k.split(".")[2])  # layer i of 4 sits at i / 3 on the gradient
            anchors = [0, 0.5, 0.3, 0.7, 1] if "self_attn" in k else [1, 0.5, 0.7, 0.3, 0]
            x = i / 3 * 4
            lo = min(int(x), 3)
            t = anchors[lo] + (x - lo) * (anchors[lo + 1] - anchors[lo])
        else:
            t = 0.5
        want[k] = _slerp(t, sd["base"][k], sd["ft1"][k])
    got = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert max(_max_diff(got[k].double(), want[k]) for k in want) < 1e-6
    diff = _max_diff(_logits(out), _logits(out, want))
    print(f"slerp slices: max |logit - hand| = {diff:.3g}")
    assert diff < 1e-5


@pytest.mark.parametrize("form", ["models", "slices"])
def test_slerp_t0_is_base_model_whatever_the_order(hf, tmp_path, form):
    """mergekit's slerp: t = 0 is base_model, even when it is listed second."""
    root, sd = hf
    if form == "models":
        body = f"models:\n  - model: {root}/ft1\n  - model: {root}/base\n"
    else:
        body = (f"slices:\n  - sources:\n      - model: {root}/ft1\n        layer_range: [0, 4]"
                f"\n      - model: {root}/base\n        layer_range: [0, 4]\n")
    out = _run(tmp_path, body + f"merge_method: slerp\nbase_model: {root}/base\n"
                                "parameters:\n  t: 0.25\n")
    got = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    want = {k: _slerp(0.25, sd["base"][k], sd["ft1"][k]) for k in sd["base"]}
    assert max(_max_diff(got[k].double(), want[k]) for k in want) < 1e-6


def _ties(base, models, weights, densities, lam=1.0):
    """float64 reference: trim each δ to its top ⌊density n⌋ |δ|, elect the sign of the weighted
    sum, weighted mean of the agreeing entries."""
    base = base.double()
    ds = []
    for m, rho in zip(models, densities):
        d = (m.double() - base).flatten()
        keep = torch.zeros_like(d, dtype=torch.bool)
        keep[d.abs().topk(int(rho * d.numel())).indices] = True
        ds.append(torch.where(keep, d, 0.0))
    sign = torch.sign(sum(w * d for w, d in zip(weights, ds)))
    agree = [(torch.sign(d) == sign) & (d != 0) for d in ds]
    num = sum(w * torch.where(a, d, 0.0) for w, d, a in zip(weights, ds, agree))
    den = sum(w * a.double() for w, a in zip(weights, agree))
    m = torch.where(den != 0, num / torch.where(den != 0, den, 1.0), num)
    return base + lam * m.view_as(base)


def test_ties_tokenizer_source_base_out_dtype(hf, tmp_path):
    """ft2 has another tokenizer (B: 6 of A's tokens missing, the rest renumbered): its
    embedding/head rows are mapped onto the base's tokenizer A token by token, the missing
    tokens taking the base's rows; the output carries A and is bfloat16."""
    root, sd = hf
    out = _run(tmp_path, f"""
models:
  - model: {root}/ft1
    parameters:
      density: 0.7
      weight: 1.0
  - model: {root}/ft2
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: {root}/base
parameters:
  normalize: true
tokenizer_source: base
out_dtype: bfloat16
dtype: float32
""")
    assert _layout(out) == _layout(root / "base")
    assert (out / "tokenizer.json").read_bytes() == (root / "base" / "tokenizer.json").read_bytes()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ref = transformers.AutoTokenizer.from_pretrained(root / "base")
    assert tok("the merge of code")["input_ids"] == ref("the merge of code")["input_ids"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("torch_dtype", cfg.get("dtype")) == "bfloat16"
    a = json.loads((root / "base" / "tokenizer.json").read_text())["model"]["vocab"]
    b = json.loads((root / "ft2" / "tokenizer.json").read_text())["model"]["vocab"]
    missing = [t for t in a if t not in b]
    assert len(missing) == 6
    ft2 = dict(sd["ft2"])
    for k in ("model.embed_tokens.weight", "lm_head.weight"):  # rows in A's order
        ft2[k] = torch.stack([sd["ft2"][k][b[t]] if t in b else sd["base"][k][a[t]]
                              for t in sorted(a, key=a.get)])  # fmt: skip
    want = {k: _ties(sd["base"][k], [sd["ft1"][k], ft2[k]], [1.0, 0.5], [0.7, 0.5])
            for k in sd["base"]}  # fmt: skip
    got = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    wdiff = max(_max_diff(got[k].double(), want[k].to(torch.bfloat16).double()) for k in want)
    ulp = max(float(want[k].abs().max()) for k in want) * 2**-7  # one bf16 step at the largest
    assert wdiff <= ulp, wdiff
    hand = _logits(out, {k: v.to(torch.bfloat16) for k, v in want.items()})
    diff = _max_diff(_logits(out), hand)
    exact = _max_diff(_logits(out), _logits(out, want))
    print(f"ties + tokenizer_source: max |weight - hand (bf16)| = {wdiff:.3g}, "
          f"max |logit - hand (bf16)| = {diff:.3g}, vs float64 hand {exact:.3g}")
    assert diff < 2e-2


def _bad(tmp_path, capsys, text, msg):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    assert main(["merge", str(p), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    assert [f.name for f in tmp_path.iterdir()] == ["bad.yaml"]  # no staging or lock left


@pytest.mark.parametrize("text,msg", [
    ("slices:\n  - sources:\n      - model: {r}/base\n        layer_range: [0, 9]\n"
     "merge_method: passthrough\n", "exceeds"),
    ("models:\n  - model: {r}/base\n  - model: {r}/ft1\nmerge_method: linear\nfoo: 1\n", "foo"),
    ("models:\n  - model: {r}/base\n  - model: {r}/ft1\nmerge_method: linear\n"
     "tokenizer_source: {r}/nowhere\n", "tokenizer_source: "),
    ("models:\n  - model: {r}/base\n  - model: {r}/ft2\nmerge_method: linear\n"
     "tokenizer_source: union\n", "building a union tokenizer is not supported"),
    ("models:\n  - model: {r}/base\n  - model: {r}/ft2\nmerge_method: linear\n",
     "different tokenizers cannot be combined"),
    ("modules:\n  text: {{models: [{{model: {r}/base}}]}}\nmerge_method: linear\n", "modules:"),
    ("slices:\n  - sources:\n      - model: {r}/base\n        layer_range: [0, 4]\n"
     "    residual_weight: 0.5\nmerge_method: passthrough\n", "slices[0].residual_weight"),
    ("models:\n  - model: {r}/base+some/lora\nmerge_method: linear\n", "LoRA"),
    ("models:\n  - model: {r}/base\nmerge_method: linear\nchat_template: chatml\n",
     "chat_template"),
    ("models:\n  - model: {r}/base\nmerge_method: linear\nout_dtype: float8\n", "out_dtype"),
    ("models:\n  - model: {r}/base\nmerge_method: linear\ntokenizer:\n  source: base\n"
     "  tokens: {{x: {{source: base}}}}\n", "tokenizer.tokens"),
])  # fmt: skip
def test_bad_input_one_line_nothing_written(hf, tmp_path, capsys, text, msg):
    root, _ = hf
    _bad(tmp_path, capsys, text.format(r=root), msg)


def test_chat_template_text_and_auto(hf, tmp_path):
    root, _ = hf
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    cfg = {"merge_method": "linear", "models": [{"model": f"{root}/base"},
                                                {"model": f"{root}/ft1"}],
           "chat_template": jinja}  # fmt: skip
    out = _run(tmp_path, yaml.safe_dump(cfg))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"
    cfg = {"merge_method": "linear", "models": [{"model": str(out)}, {"model": str(out)},
                                                {"model": f"{root}/ft1"}],
           "chat_template": "auto", "tokenizer_source": "base"}  # fmt: skip
    again = _run(tmp_path, yaml.safe_dump(cfg), "again")
    assert transformers.AutoTokenizer.from_pretrained(again).chat_template == jinja
