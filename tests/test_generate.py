"""`moe generate` and `moe.generate`: KV-cache decoding, sampling, the routing record and its
views, the command line and its refusals."""

import html.parser
import json

import pytest
import torch
from generate_fixtures import (
    no_tokenizer_checkpoint,
    save_tiny,
    tiny_model,
    word_checkpoint,
    word_tokenizer,
)

from moe.cli import main
from moe.config import ConfigError
from moe.data.tokenizer import ByteTokenizer, HFTokenizer
from moe.generate import routing_view
from moe.generate.generation import generate, samples_markdown, token_pieces

EXPERTS = ("text", "code", "dna")


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------- vs transformers


@pytest.mark.parametrize("tied", [False, True])
def test_greedy_equals_transformers_generate_token_for_token(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    from moe.io.checkpoint import load_checkpoint
    from moe.io.hf import import_hf
    from moe.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=259, max_position_embeddings=128,
        tie_word_embeddings=tied, initializer_range=0.2,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ck = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "ours"))
    ours = Transformer(ck.config).eval()
    ours.load_state_dict(ck.state_dict)
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        want = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False
        )[0].tolist()
    got = generate(ours, ByteTokenizer(), prompt[0], 40, stop_at_eos=False)
    assert got.ids == want
    assert got.prompt_len == 9 and len(got.new_ids) == 40 and got.stop == "max_new_tokens"
    assert len(set(got.new_ids)) > 3  # a real continuation, not one repeated token


# ----------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("experts", [(), EXPERTS])
def test_cached_forward_equals_full_forward(experts):
    m = tiny_model(experts=experts)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = m(ids).logits
        cache = m.new_cache(batch=2)
        chunks = [m(ids[:, :7], cache=cache).logits]  # prefill
        chunks += [m(ids[:, 7:12], cache=cache).logits]  # several tokens after a past
        chunks += [m(ids[:, t : t + 1], cache=cache).logits for t in range(12, 20)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=0, atol=1e-5)
    with torch.no_grad():
        last = m(ids, last_logits_only=True).logits
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-6)


def test_cache_refuses_positions_past_the_context():
    m = tiny_model(max_seq_len=16)
    cache = m.new_cache()
    m(torch.zeros(1, 10, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 7, dtype=torch.long), cache=cache)


@pytest.mark.parametrize(
    "experts,router,sampling",
    [((), "learned", {}), (EXPERTS, "learned", {}), (EXPERTS, "learned", {"seed": 3}),
     (EXPERTS, "domain", {"seed": 5, "top_k": 20})],
)  # fmt: skip
def test_generation_with_kv_cache_equals_without(experts, router, sampling):
    m = tiny_model(experts=experts, router=router)
    dom = "code" if router == "domain" else None
    a = generate(m, None, "def f(x):", 30, domain=dom, **sampling)
    b = generate(m, None, "def f(x):", 30, domain=dom, use_cache=False, **sampling)
    assert a.ids == b.ids and a.text == b.text
    if experts:
        assert torch.equal(a.routing.expert_ids, b.routing.expert_ids)
        torch.testing.assert_close(a.routing.weights, b.routing.weights, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- routing record


@pytest.mark.parametrize("router", ["learned", "domain"])
def test_routing_record_equals_routers_choices_in_a_plain_forward(router):
    m = tiny_model(experts=EXPERTS, router=router, seed=2)
    g = generate(m, None, "ACGTTGCA", 25, domain="dna" if router == "domain" else None)
    T = len(g.ids)
    r = g.routing
    assert r.experts == list(EXPERTS) and r.layers == [0, 1]
    assert r.expert_ids.shape == (2, T, 2 if router == "learned" else 1)
    dom = torch.tensor([2]) if router == "domain" else None
    with torch.no_grad():
        out = m(torch.tensor([g.ids]), domain=dom)
    for i, st in enumerate(out.router_stats):
        assert torch.equal(r.expert_ids[i], st["expert_ids"])
        torch.testing.assert_close(r.weights[i], st["weights"].float(), rtol=0, atol=1e-5)
    if router == "domain":
        assert (r.expert_ids == 2).all() and (r.weights == 1).all()
    share = r.share()
    assert share.shape == (2, 3)
    torch.testing.assert_close(share.sum(-1), torch.ones(2, dtype=torch.float64))


def test_dense_model_has_no_routing_record():
    g = generate(tiny_model(), None, "hello", 5)
    assert g.routing is None and g.to_dict()["routing"] is None


# ----------------------------------------------------------------------------- sampling, stops


def test_seeded_sampling_repeats_and_seeds_differ():
    m = tiny_model(experts=EXPERTS)
    a = generate(m, None, "the", 40, temperature=1.5, seed=7)
    b = generate(m, None, "the", 40, temperature=1.5, seed=7)
    c = generate(m, None, "the", 40, temperature=1.5, seed=8)
    assert a.ids == b.ids and a.seed == 7
    assert a.ids != c.ids
    fresh = generate(m, None, "the", 10, top_p=0.9)
    assert fresh.seed is not None  # a seed is drawn and reported
    assert generate(m, None, "the", 10, top_p=0.9, seed=fresh.seed).ids == fresh.ids


def test_top_k_one_and_tiny_top_p_are_greedy():
    m = tiny_model()
    greedy = generate(m, None, "abc", 20)
    assert greedy.sampling == {"greedy": True} and greedy.seed is None
    assert generate(m, None, "abc", 20, top_k=1, seed=1).ids == greedy.ids
    assert generate(m, None, "abc", 20, top_p=1e-6, seed=2).ids == greedy.ids


def test_stops_at_eos_and_at_the_context():
    m = tiny_model(max_seq_len=24)
    with torch.no_grad():  # a large EOS row: greedy reaches EOS within a few tokens
        m.lm_head.weight[ByteTokenizer.EOS] = m.norm.weight * 50
    g = generate(m, None, "hi", 10)
    assert g.stop == "eos" and g.new_ids[-1] == ByteTokenizer.EOS
    assert ByteTokenizer.EOS not in g.new_ids[:-1] and len(g.text) == len(g.new_ids) - 1
    assert "EOS" in g.note()
    g = generate(m, None, "hi", 100, stop_at_eos=False)
    assert g.stop == "context" and len(g.ids) == 24 and "context (24 tokens)" in g.note()


def test_byte_prompt_gets_bos_and_ids_are_taken_as_given():
    m = tiny_model()
    g = generate(m, None, "ab", 3)
    assert g.ids[:3] == [ByteTokenizer.BOS, 97, 98] and g.prompt == "ab"
    g = generate(m, None, [97, 98], 3)
    assert g.ids[:2] == [97, 98] and g.prompt_len == 2
    import moe.generate

    assert moe.generate.generate is generate  # the documented import


@pytest.mark.parametrize(
    "kw,match",
    [({"temperature": 0}, "temperature"), ({"temperature": -1.0}, "temperature"),
     ({"top_p": 0.0}, "top-p"), ({"top_p": 1.5}, "top-p"), ({"top_k": 0}, "top-k"),
     ({"max_new_tokens": 0}, "max-new-tokens"), ({"prompt": "x" * 64}, "context"),
     ({"domain": "klingon"}, "klingon"), ({"prompt": [300]}, "vocabulary")],
)  # fmt: skip
def test_bad_options_are_one_line_config_errors(kw, match):
    m = tiny_model(experts=EXPERTS, router="domain")
    kw = {"prompt": "hi", "domain": "code", **kw}
    with pytest.raises(ConfigError, match=match) as e:
        generate(m, None, **kw)
    assert "\n" not in str(e.value)


def test_domain_router_needs_a_domain():
    with pytest.raises(ConfigError, match="--domain"):
        generate(tiny_model(experts=EXPERTS, router="domain"), None, "hi", 3)


# ----------------------------------------------------------------------------- tokenizers


def test_token_pieces_byte_and_word_tokenizers(tmp_path):
    ids = [ByteTokenizer.BOS] + list("é!".encode()) + [ByteTokenizer.EOS]
    pieces, specials = token_pieces(ByteTokenizer(), ids)
    assert pieces == ["", "", "é", "!", ""]
    assert specials == ["bos", None, None, None, "eos"]
    tok = HFTokenizer(str(word_tokenizer(tmp_path / "tok")))
    pieces, specials = token_pieces(tok, [1, 3, 4, 8, 2])
    assert pieces == ["", "hello", " world", " code", ""]
    assert specials == ["bos", None, None, None, "eos"]


def test_generate_with_a_checkpoints_own_tokenizer(tmp_path, capsys):
    ck = word_checkpoint(tmp_path / "words")
    rc, out, err = _run(["generate", ck, "--prompt", "hello world", "--max-new-tokens", "5",
                         "--json", tmp_path / "g.json"], capsys)  # fmt: skip
    assert rc == 0, err
    rec = json.loads((tmp_path / "g.json").read_text())
    assert rec["ids"][:3] == [1, 3, 4] and rec["prompt"] == "hello world"  # BOS first
    assert all(0 <= i < 10 for i in rec["ids"])
    assert out.startswith("hello world ") and out.rstrip("\n") == rec["prompt"] + rec["text"]
    rc, out, err = _run(["generate", ck, "--prompt", "hello klingon"], capsys)
    assert rc == 2 and "cannot encode" in err and "unknown" in err


def test_a_vocabulary_without_its_tokenizer_is_refused(tmp_path, capsys):
    ck = no_tokenizer_checkpoint(tmp_path / "v300")
    rc, out, err = _run(["generate", ck, "--prompt", "hi"], capsys)
    assert rc == 2 and err.startswith("moe: error: ") and "300 tokens" in err
    assert err.count("\n") == 1 and "--tokenizer" in err
    # the model's tokenizer given on the command line
    tok = word_tokenizer(tmp_path / "tok")
    rc, out, err = _run(["generate", ck, "--prompt", "the expert", "--max-new-tokens", "4",
                         "--tokenizer", tok], capsys)  # fmt: skip
    assert rc == 0, err
    assert out.startswith("the expert")


# ----------------------------------------------------------------------------- views


def test_plain_and_terminal_views():
    m = tiny_model(experts=EXPERTS, seed=1)
    g = generate(m, None, "def f():\n    return 1", 12)
    plain = routing_view.render_plain(g, width=60)
    assert "t = text, c = code, d = dna" in plain and "share of tokens" in plain
    rows = plain.splitlines()
    texts = [i for i, ln in enumerate(rows) if ln.startswith("text ")]
    assert texts and all(rows[i + 1].startswith("layer 0") for i in texts)
    for i in texts:  # one letter under each character
        assert len(rows[i + 1].rstrip()) <= len(rows[i]) and len(rows[i + 2]) == len(rows[i])
    assert "⏎" in plain and "▶" in plain
    term = routing_view.render_terminal(g, color=True, cols=80)
    assert "\x1b[30;48;5;" in term and "layer 1 │ " in term and " text " in term
    one = routing_view.render_terminal(g, layer=1, color=True, cols=80)
    assert "layer 0 │" not in one and "layer 1 │" in one
    assert routing_view.render_terminal(g, color=False, cols=60) == plain


class _Checker(html.parser.HTMLParser):
    VOID = {"meta", "br", "hr", "img", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.spans, self.titles, self.bad, self.tags = [], 0, [], [], set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag in ("script", "link", "img", "iframe") or "src" in a or "href" in a:
            self.bad.append(tag)
        if tag == "span" and "title" in a:
            self.spans += 1
            self.titles.append(a["title"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, (tag, self.stack)


def test_html_page_is_self_contained_and_parses():
    m = tiny_model(experts=EXPERTS, seed=1)
    g = generate(m, None, "<b>x</b> & \"y\"\n", 10)
    page = routing_view.render_html(g, source="ckpt")
    p = _Checker()
    p.feed(page)
    p.close()
    assert p.stack == [] and p.bad == []
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page and "url(" not in page
    n_units = len(routing_view.units(g))
    assert p.spans == 2 * n_units  # one coloured span per character per layer
    assert all("layer 0:" in t and "layer 1:" in t for t in p.titles)
    assert ">&lt;</span>" in page and "b" not in p.tags  # the prompt's markup is text


def test_cli_show_routing_html_json(tmp_path, capsys):
    ck = save_tiny(tmp_path / "moe", kind="moe", experts=EXPERTS)
    argv = ["generate", ck, "--prompt", "ACGT", "--max-new-tokens", "8", "--show-routing",
            "--color", "never", "--html", tmp_path / "r.html", "--json", tmp_path / "r.json"]
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err
    assert "layer 0" in out and "layer 1" in out and "share of tokens" in out
    assert "reached --max-new-tokens after 8 new tokens" in err
    rec = json.loads((tmp_path / "r.json").read_text())
    assert len(rec["ids"]) == 13 and len(rec["tokens"]) == 13
    assert [ly["layer"] for ly in rec["routing"]["layers"]] == [0, 1]
    assert len(rec["routing"]["layers"][0]["expert_ids"]) == 13
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    rc, out, err = _run(["generate", ck, "--prompt", "ACGT", "--max-new-tokens", "8",
                         "--show-routing", "--color", "always", "--layer", "1"], capsys)
    assert rc == 0 and "\x1b[" in out and "layer 0" not in out
    # sampling repeats with the seed the command reports
    rc, out1, err = _run(["generate", ck, "--top-p", "0.9", "--max-new-tokens", "12"], capsys)
    seed = err.split("--seed ")[1].split()[0]
    rc, out2, _ = _run(["generate", ck, "--seed", seed, "--top-p", "0.9",
                        "--max-new-tokens", "12"], capsys)  # fmt: skip
    assert rc == 0 and out1 == out2


@pytest.mark.parametrize(
    "extra,match",
    [(["--html", "{tmp}/nodir/r.html"], "nodir"), (["--domain", "klingon"], "klingon"),
     (["--temperature", "0"], "temperature"), (["--top-p", "1.5"], "top-p"),
     (["--layer", "5"], "--layer 5"), (["--prompt-file", "{tmp}/none.txt"], "none.txt")],
)  # fmt: skip
def test_cli_refusals_write_nothing(tmp_path, capsys, extra, match):
    ck = save_tiny(tmp_path / "moe", kind="moe", experts=EXPERTS)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    argv = ["generate", ck, "--json", tmp_path / "out.json",
            *[a.replace("{tmp}", str(tmp_path)) for a in extra]]  # fmt: skip
    rc, out, err = _run(argv, capsys)
    assert rc == 2 and err.startswith("moe: error: ") and match in err, err
    assert err.count("\n") == 1 and out == ""
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_cli_dense_refuses_routing_views_and_domains(tmp_path, capsys):
    ck = save_tiny(tmp_path / "dense")
    rc, _, err = _run(["generate", ck, "--show-routing"], capsys)
    assert rc == 2 and "dense model" in err
    rc, _, err = _run(["generate", ck, "--domain", "code"], capsys)
    assert rc == 2 and "dense model" in err
    rc, out, err = _run(["generate", ck, "--prompt", "a", "--max-new-tokens", "3"], capsys)
    assert rc == 0 and out.startswith("a")


def test_cli_prompt_file_takes_bytes_as_they_are(tmp_path, capsys):
    ck = save_tiny(tmp_path / "dense")
    (tmp_path / "p.txt").write_bytes(b"caf\xe9")  # Latin-1: not UTF-8, fine for bytes
    argv = ["generate", ck, "--prompt-file", tmp_path / "p.txt", "--max-new-tokens", "2",
            "--json", tmp_path / "g.json"]  # fmt: skip
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "g.json").read_text())["ids"][:5] == [256, 99, 97, 102, 0xE9]


# ----------------------------------------------------------------------------- report section


def test_samples_markdown():
    entries = [
        ("seed", tiny_model(seed=0)),
        ("moe", tiny_model(seed=1, experts=EXPERTS)),
        ("joint", tiny_model(seed=2, experts=("text", "code"), router="domain")),
    ]
    prompts = {"text": "To be, or not", "code": "def main(", "dna": "ACGTAC"}
    md = samples_markdown(entries, prompts, max_new_tokens=10)
    assert md.startswith("## Samples\n")
    for dom in prompts:
        assert f"### {dom}" in md
    assert md.count("**seed**") == 3 and md.count("Routing of moe:") == 3
    assert md.count("Routing of joint:") == 2
    assert "**joint**: no expert for domain 'dna'" in md
    assert md.count("```") % 2 == 0
    # deterministic: greedy
    assert samples_markdown(entries, prompts, max_new_tokens=10) == md


def test_a_tiny_temperature_samples_the_argmax_instead_of_nan():
    """logits / 1e-320 overflows to inf and the softmax to NaN unless shifted by the maximum."""
    import torch

    from moe.generate.generation import Sampler

    logits = torch.tensor([0.5, 3.0, -2.0, 2.999])
    g = torch.Generator().manual_seed(0)
    for t in (1e-320, 1e-30, 1e-6):
        assert int(Sampler(False, t, generator=g)(logits)) == 1
    # shifting leaves ordinary temperatures' distribution unchanged
    draws = torch.stack([Sampler(False, 2.0, generator=g)(logits) for _ in range(2000)])
    freq = torch.bincount(draws, minlength=4).float() / 2000
    assert torch.allclose(freq, (logits / 2.0).softmax(-1), atol=0.04)
