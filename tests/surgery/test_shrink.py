"""`moe shrink`: magnitude selection finds dead units (so removing them is exact), Block Influence
picks the layer, healing is a resumable training stage, bad input is refused."""

from __future__ import annotations

import pytest
import torch
from generate_fixtures import save_tiny, tiny_config

from moe.cli import main
from moe.io.checkpoint import is_checkpoint, load_checkpoint, make_meta, read_meta, save_checkpoint
from moe.model.transformer import Transformer
from moe.surgery.shrink import ShrinkSpec, shrink_state


def logits(cfg, sd, domain=None):
    m = Transformer(cfg)
    m.load_state_dict(sd)
    m.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return m(ids, domain=domain).logits


def with_dead_units(experts=()):
    """A model whose neurons 0..11 (of 48) have zero output weights and whose kv group 1 has
    zero wo columns: magnitude pruning must remove exactly those, leaving the function."""
    torch.manual_seed(0)
    cfg = tiny_config(experts=experts).resolved()
    sd = Transformer(cfg).state_dict()
    for i in range(cfg.n_layers):
        if experts:
            sd[f"layers.{i}.ffn.w2"][:, 36:48] = 0  # (E, F, C)
        else:
            sd[f"layers.{i}.ffn.w2.weight"][:, 36:48] = 0  # (C, F)
        sd[f"layers.{i}.attn.wo.weight"][:, 16:32] = 0  # group 1 = query heads 2, 3
    return cfg, sd


@pytest.mark.parametrize("experts", [(), ("a", "b")])
def test_magnitude_removes_dead_units_exactly(experts):
    cfg, sd = with_dead_units(experts)
    cfg2, sd2, rec = shrink_state(cfg, sd, ShrinkSpec(ffn=0.25, heads=0.5))
    assert (cfg2.moe.expert_ffn_dim or cfg2.ffn_dim) == 36 and cfg2.n_heads == 2
    assert rec["kv_groups_kept"] == [[0], [0]]
    assert (logits(cfg, sd) - logits(cfg2, sd2)).abs().max() < 1e-5


def test_random_selection_is_seeded_and_differs_from_magnitude():
    cfg, sd = with_dead_units()
    a = shrink_state(cfg, sd, ShrinkSpec(ffn=0.25, select="random", seed=1))[1]
    b = shrink_state(cfg, sd, ShrinkSpec(ffn=0.25, select="random", seed=1))[1]
    c = shrink_state(cfg, sd, ShrinkSpec(ffn=0.25, select="random", seed=2))[1]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.ffn.w1.weight"], c["layers.0.ffn.w1.weight"])
    assert (logits(cfg, sd) - logits(*shrink_state(cfg, sd, ShrinkSpec(ffn=0.25))[:2])).abs(
    ).max() < 1e-5  # fmt: skip


def test_channels_and_layers(tmp_path):
    src = save_tiny(tmp_path / "src")
    out = tmp_path / "s"
    assert main(["shrink", str(src), "--out", str(out), "--channels", "0.25",
                 "--drop-layers", "1", "--select", "random"]) == 0  # fmt: skip
    ck = load_checkpoint(out)
    assert (ck.config.dim, ck.config.n_layers, ck.config.head_dim) == (24, 1, 8)
    meta = read_meta(out)
    assert meta["kind"] == "shrink" and meta["recipe"]["shrink"]["removed"]["layers_removed"] == [1]
    assert meta["parents"] == [read_meta(src)["id"]]


def test_block_influence_picks_the_identity_layer(debug_dense, tmp_path):
    """Make layer 1 of a trained model an identity copy (BI 0): --bi-layers 1 removes it, and
    the result equals the original model."""
    from moe.surgery.structure import insert_identity

    ck = load_checkpoint(debug_dense / "model")
    cfg, sd = insert_identity(ck.config, ck.state_dict, [0])
    src = save_checkpoint(tmp_path / "src", sd, cfg, make_meta(recipe=ck.meta["recipe"]))
    out = tmp_path / "bi"
    assert main(["shrink", str(src), "--out", str(out), "--bi-layers", "1", "--by", "code",
                 "--calib-batches", "2"]) == 0  # fmt: skip
    rec = read_meta(out)["recipe"]["shrink"]["removed"]
    assert rec["layers_removed"] == [1] and abs(rec["block_influence"][1]) < 1e-6
    cut = load_checkpoint(out)
    assert (
        logits(cut.config, cut.state_dict) - logits(ck.config, ck.state_dict)
    ).abs().max() < 1e-5


def test_heal_is_a_resumable_stage(debug_dense, tmp_path):
    out = tmp_path / "healed"
    cmd = ["shrink", str(debug_dense), "--out", str(out), "--ffn", "0.5", "--heal-steps", "4",
           "trainer.enable_progress_bar=false"]  # fmt: skip
    assert main(cmd) == 0
    assert is_checkpoint(out / "cut") and is_checkpoint(out / "model")
    meta = read_meta(out / "model")
    assert meta["parents"] == [read_meta(out / "cut")["id"]]
    assert load_checkpoint(out / "model").config.ffn_dim == 96
    first = (out / "model" / "model.safetensors").read_bytes()
    assert main(cmd) == 0  # the same command again: done already, nothing retrained
    assert (out / "model" / "model.safetensors").read_bytes() == first
    assert main([*cmd[:5], "0.25", *cmd[6:]]) == 2  # other arguments: refused without overwrite


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--ffn", "1.0"], "in [0, 1)"),
        (["--heads", "0.9"], "removes every one"),
        (["--drop-layers", "0,1"], "leaves no layer"),
        (["--drop-layers", "2"], "out of range"),
        (["--drop-layers", "1,1"], "twice"),
        (["--bi-layers", "2"], "leaves no layer"),
        (["--select", "big", "--ffn", "0.5"], "random, magnitude"),
        ([], "nothing to do"),
        (["--ffn", "0.5", "optim.lr=0.1"], "give --heal-steps"),
        (["--ffn", "0.5", "--heal-steps", "2", "optim.nope=1"], "healing override"),
        (["--bi-layers", "1", "--by", "klingon"], "not one of the checkpoint's domains"),
    ],
)
def test_shrink_bad_input_one_line_nothing_written(tmp_path, capsys, args, msg):
    src = save_tiny(tmp_path / "src")
    out = tmp_path / "s"
    assert main(["shrink", str(src), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1, err
    assert not out.exists()
