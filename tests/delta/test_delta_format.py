"""Delta files end to end: extract -> apply round-trips exactly, info's bytes are the file's,
lineage and hash refusals write nothing, and the CLI's one-line errors."""

import json

import pytest
import torch

from moe.cli import main
from moe.config import ConfigError, ModelConfig
from moe.delta import ops
from moe.delta.format import read_delta
from moe.io.checkpoint import load_checkpoint, make_meta, save_checkpoint
from moe.model.transformer import Transformer

CFG = ModelConfig(size="debug", dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=96,
                  max_seq_len=64)  # fmt: skip


def _ckpt(path, sd, **meta):
    m = make_meta(**meta)
    save_checkpoint(path, sd, CFG, m)
    return path, m


@pytest.fixture
def family(tmp_path):
    """A base, a fine-tune of it (AdamW-like small updates, some crossing zero), an unrelated
    model, and a second base with other weights but the same lineage id."""
    torch.manual_seed(0)
    base_sd = Transformer(CFG).state_dict()
    base, bm = _ckpt(tmp_path / "base", base_sd, family="code", domain="code")
    g = torch.Generator().manual_seed(1)
    ft_sd = {k: v + 3e-3 * torch.randn(v.shape, generator=g) for k, v in base_sd.items()}
    ft, fm = _ckpt(tmp_path / "ft", ft_sd, parents=[bm["id"]], base_id=bm["base_id"],
                   family="code", domain="code", kind="branch", tokens_seen=1000)
    other, _ = _ckpt(tmp_path / "other", Transformer(CFG).state_dict())
    twin_sd = {k: v + 1e-6 for k, v in base_sd.items()}
    twin, _ = _ckpt(tmp_path / "twin", twin_sd, base_id=bm["base_id"], family="code")
    return base, ft, other, twin, tmp_path


def test_extract_apply_roundtrips_exactly(family):
    base, ft, _, _, tmp = family
    info = ops.extract(base, ft, tmp / "d.delta.safetensors")
    assert info["exact"] is True and info["method"] == "lossless"
    assert info["bytes"] == (tmp / "d.delta.safetensors").stat().st_size
    out = ops.apply_delta(base, tmp / "d.delta.safetensors", tmp / "applied")
    got, want = load_checkpoint(out), load_checkpoint(ft)
    for k, v in want.state_dict.items():
        assert torch.equal(got.state_dict[k], v), k  # bit for bit
    assert got.meta["parents"] == [load_checkpoint(base).meta["id"], want.meta["id"]]
    assert got.meta["family"] == "code" and got.meta["base_id"] == want.meta["base_id"]
    assert got.meta["tokenizer"]["kind"] == "byte"


@pytest.mark.parametrize("spec", ["none", "topk:0.1+int8", "lowrank:4+int4", "dare:0.3",
                                  "bitdelta"])
def test_compress_info_bytes_and_apply(family, spec):
    base, ft, _, _, tmp = family
    ops.extract(base, ft, tmp / "d.delta.safetensors")
    info = ops.compress(tmp / "d.delta.safetensors", spec, tmp / "c.delta.safetensors")
    assert info["bytes"] == (tmp / "c.delta.safetensors").stat().st_size
    assert ops.info(tmp / "c.delta.safetensors") == info
    assert info["bytes"] < (tmp / "d.delta.safetensors").stat().st_size
    d = read_delta(tmp / "c.delta.safetensors")
    out = ops.apply_delta(base, tmp / "c.delta.safetensors", tmp / "applied")
    got, b = load_checkpoint(out).state_dict, load_checkpoint(base).state_dict
    for k in b:  # apply = base + decoded delta, rounded once
        assert torch.equal(got[k], (b[k].double() + d.dense(k)).float())


def test_apply_to_another_base_is_refused(family):
    base, ft, _, twin, tmp = family
    ops.extract(base, ft, tmp / "d.delta.safetensors")
    with pytest.raises(ConfigError, match="apply a delta to its own base"):
        ops.apply_delta(twin, tmp / "d.delta.safetensors", tmp / "applied")
    assert not (tmp / "applied").exists()


@pytest.mark.parametrize("scale, message", [(float("nan"), "must be a finite number"),
                                            (float("inf"), "must be a finite number"),
                                            (1e45, "overflows in")])
def test_apply_refuses_a_scale_that_makes_weights_non_finite(family, scale, message):
    base, ft, _, _, tmp = family
    ops.extract(base, ft, tmp / "d.delta.safetensors")
    with pytest.raises(ConfigError, match=message):
        ops.apply_delta(base, tmp / "d.delta.safetensors", tmp / "applied", scale=scale)
    assert not (tmp / "applied").exists()


def test_extract_refuses_other_lineage(family):
    base, _, other, _, tmp = family
    with pytest.raises(ConfigError, match="lineage differs"):
        ops.extract(base, other, tmp / "x.delta.safetensors")
    assert not (tmp / "x.delta.safetensors").exists()


def test_extract_refuses_other_family_unless_allowed(family):
    base, _, _, _, tmp = family
    torch.manual_seed(3)
    bm = load_checkpoint(base).meta
    dna, _ = _ckpt(tmp / "dna", Transformer(CFG).state_dict(), base_id=bm["base_id"],
                   family="dna")
    with pytest.raises(ConfigError, match="expert family"):
        ops.extract(base, dna, tmp / "x.delta.safetensors")
    assert not (tmp / "x.delta.safetensors").exists()
    assert ops.extract(base, dna, tmp / "x.delta.safetensors", allow_cross_family=True)


def test_cli_errors_are_one_line_and_write_nothing(family, capsys):
    base, ft, _, twin, tmp = family
    d = tmp / "d.delta.safetensors"
    assert main(["delta", "extract", str(base), str(ft), "-o", str(d)]) == 0
    cases = [
        (["delta", "compress", str(d), "topk:0", "-o", str(tmp / "a.delta.safetensors")],
         "density must be in (0, 1]"),
        (["delta", "compress", str(d), "lowrank:64", "-o", str(tmp / "a.delta.safetensors")],
         "rank 64 is larger"),
        (["delta", "apply", str(twin), str(d), "-o", str(tmp / "a")], "its own base"),
        (["delta", "info", str(base / "model.safetensors")], "not a moe-forge delta file"),
        (["delta", "compress", str(d), "topk:0.1", "-o", str(d)], "already exists"),
    ]
    capsys.readouterr()
    for argv, msg in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("moe: error:") and msg in err and "\n" not in err
    assert not (tmp / "a.delta.safetensors").exists() and not (tmp / "a").exists()


def test_cli_info_json(family, capsys):
    base, ft, _, _, tmp = family
    d = tmp / "d.delta.safetensors"
    main(["delta", "extract", str(base), str(ft), "-o", str(d)])
    main(["delta", "compress", str(d), "lowrank:2+int8", "-o", str(tmp / "c.delta.safetensors")])
    capsys.readouterr()
    assert main(["delta", "info", str(tmp / "c.delta.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bytes"] == (tmp / "c.delta.safetensors").stat().st_size
    assert info["lowrank_ranks"] == [2] and info["method"] == "lowrank:2+int8"


def test_truncated_delta_is_a_one_line_error(family):
    base, ft, _, _, tmp = family
    d = tmp / "d.delta.safetensors"
    ops.extract(base, ft, d)
    data = d.read_bytes()
    (tmp / "cut.delta.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ConfigError, match="corrupted delta file"):
        ops.info(tmp / "cut.delta.safetensors")
    with pytest.raises(ConfigError, match="corrupted delta file"):
        ops.apply_delta(base, tmp / "cut.delta.safetensors", tmp / "out")
    assert not (tmp / "out").exists()
