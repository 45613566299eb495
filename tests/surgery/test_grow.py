"""`moe grow` end to end: exact logits, lineage, tokenizer carried, bad input refused."""

from __future__ import annotations

import json

import pytest
import torch
from generate_fixtures import save_tiny, word_checkpoint

from moe.cli import main
from moe.io.checkpoint import load_checkpoint, read_meta
from moe.model.transformer import Transformer


def logits_of(path, domain=None):
    ck = load_checkpoint(path)
    m = Transformer(ck.config)
    m.load_state_dict(ck.state_dict)
    m.eval()
    ids = torch.randint(
        0, ck.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        return m(ids, domain=domain).logits


@pytest.mark.parametrize(
    "args,check",
    [
        (["--ffn-dim", "64", "--method", "split", "--noise", "0.05"], lambda c: c.ffn_dim == 64),
        (["--dim", "48", "--kv-heads", "3"], lambda c: (c.dim, c.n_heads) == (48, 6)),
        (["--identity-after", "0,1"], lambda c: c.n_layers == 4),
        (
            ["--ffn-dim", "56", "--kv-heads", "4", "--method", "split", "--identity-after", "1"],
            lambda c: (c.ffn_dim, c.n_kv_heads, c.n_layers) == (56, 4, 3),
        ),
    ],
)
def test_grow_cli_is_exact_and_keeps_lineage(tmp_path, args, check):
    src = save_tiny(tmp_path / "src", tie_embeddings=True)
    out = tmp_path / "grown"
    assert main(["grow", str(src), "--out", str(out), *args]) == 0
    ck = load_checkpoint(out)
    assert check(ck.config)
    assert (logits_of(src) - logits_of(out)).abs().max() < 1e-5
    meta, parent = read_meta(out), read_meta(src)
    assert meta["parents"] == [parent["id"]] and meta["base_id"] == parent["base_id"]
    assert meta["kind"] == "grow" and meta["recipe"]["grow"]["source"] == str(src)


def test_grow_moe_domain_router(tmp_path):
    src = save_tiny(tmp_path / "src", experts=["text", "code"], router="domain", kind="moe")
    out = tmp_path / "g"
    assert main(["grow", str(src), "--out", str(out), "--ffn-dim", "60", "--dim", "40"]) == 0
    dom = torch.tensor([0, 1])
    assert (logits_of(src, dom) - logits_of(out, dom)).abs().max() < 1e-5


def test_solar_duplicate_layout(tmp_path):
    src = save_tiny(tmp_path / "src")
    out = tmp_path / "solar"
    assert main(["grow", str(src), "--out", str(out), "--duplicate", "0:2"]) == 0
    a, b = load_checkpoint(src).state_dict, load_checkpoint(out).state_dict
    for new, old in enumerate([0, 1, 0, 1]):
        assert torch.equal(b[f"layers.{new}.attn.wq.weight"], a[f"layers.{old}.attn.wq.weight"])


def test_grow_carries_the_tokenizer(tmp_path):
    src = word_checkpoint(tmp_path / "w")
    out = tmp_path / "g"
    assert main(["grow", str(src), "--out", str(out), "--ffn-dim", "64"]) == 0
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert read_meta(out)["tokenizer"]["kind"] == "hf"  # the word tokenizer, not the byte one


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--ffn-dim", "16"], "smaller than the model's 48"),
        (["--dim", "16"], "smaller"),
        (["--identity-after", "2"], "out of range"),
        (["--layers", "0,5"], "out of range"),
        (["--layers", "0"], "fewer than"),
        (["--duplicate", "1:1"], "A < B"),
        (["--duplicate", "0:3"], "0 <= A < B <= 2"),
        (["--method", "copy", "--ffn-dim", "64"], "unknown method"),
        ([], "nothing to do"),
        (["--identity-after", "x"], "integers"),
    ],
)
def test_grow_bad_input_one_line_nothing_written(tmp_path, capsys, args, msg):
    src = save_tiny(tmp_path / "src")
    out = tmp_path / "g"
    assert main(["grow", str(src), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".g")]


def test_grow_refuses_existing_output(tmp_path, capsys):
    src = save_tiny(tmp_path / "src")
    assert main(["grow", str(src), "--out", str(src), "--ffn-dim", "64"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert json.loads((src / "config.json").read_text())["ffn_dim"] == 48
