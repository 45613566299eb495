"""`moe merge` with delta files as models: equal to merging the checkpoints they stand for;
cross-family deltas need the explicit flag; a delta over another base is refused."""

import pytest
import torch

from moe.config import ConfigError, ModelConfig
from moe.delta import ops
from moe.io.checkpoint import load_checkpoint, make_meta, save_checkpoint
from moe.merge import merge, merge_config_from_dict
from moe.model.transformer import Transformer

CFG = ModelConfig(size="debug", dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=96,
                  max_seq_len=64)  # fmt: skip


@pytest.fixture
def fam(tmp_path):
    torch.manual_seed(0)
    base_sd = Transformer(CFG).state_dict()
    bm = make_meta()
    save_checkpoint(tmp_path / "base", base_sd, CFG, bm)
    fts = {}
    for i, family in enumerate(["code", "code", "dna"]):
        g = torch.Generator().manual_seed(i + 1)
        sd = {k: v + 3e-3 * torch.randn(v.shape, generator=g) for k, v in base_sd.items()}
        m = make_meta(parents=[bm["id"]], base_id=bm["base_id"], family=family, domain=family)
        save_checkpoint(tmp_path / f"ft{i}", sd, CFG, m)
        ops.extract(tmp_path / "base", tmp_path / f"ft{i}", tmp_path / f"d{i}.delta.safetensors")
        fts[i] = tmp_path / f"ft{i}"
    return tmp_path


def _merge(tmp, models, out, method="task_arithmetic", **kw):
    cfg = merge_config_from_dict({"merge_method": method, "base_model": str(tmp / "base"),
                                  "models": [{"model": str(m)} for m in models], **kw})
    return load_checkpoint(merge(cfg, tmp / out, progress=False))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_merge_from_lossless_deltas_equals_merge_of_checkpoints(fam, method):
    a = _merge(fam, [fam / "ft0", fam / "ft1"], "from_ckpts", method)
    b = _merge(fam, [fam / "d0.delta.safetensors", fam / "d1.delta.safetensors"], "from_deltas",
               method)  # fmt: skip
    for k, v in a.state_dict.items():
        assert torch.equal(b.state_dict[k], v), k
    assert b.meta["family"] == "code" and b.meta["parents"] == a.meta["parents"]


def test_merge_from_compressed_deltas_equals_merge_of_applied(fam):
    for i in (0, 1):
        ops.compress(fam / f"d{i}.delta.safetensors", "topk:0.1+int8",
                     fam / f"c{i}.delta.safetensors")
        ops.apply_delta(fam / "base", fam / f"c{i}.delta.safetensors", fam / f"applied{i}")
    a = _merge(fam, [fam / "applied0", fam / "applied1"], "m1")
    b = _merge(fam, [fam / "c0.delta.safetensors", fam / "c1.delta.safetensors"], "m2")
    for k, v in a.state_dict.items():
        assert torch.equal(b.state_dict[k], v), k


def test_cross_family_deltas_need_the_flag(fam):
    models = [fam / "d0.delta.safetensors", fam / "d2.delta.safetensors"]
    with pytest.raises(ConfigError, match="different expert families"):
        _merge(fam, models, "x")
    assert not (fam / "x").exists()
    assert _merge(fam, models, "x", allow_cross_family=True).meta["family"] is None


def test_delta_over_another_base_is_refused(fam):
    torch.manual_seed(9)
    save_checkpoint(fam / "other", Transformer(CFG).state_dict(), CFG, make_meta())
    cfg = merge_config_from_dict({"merge_method": "task_arithmetic",
                                  "base_model": str(fam / "other"),
                                  "models": [{"model": str(fam / "d0.delta.safetensors")}]})
    with pytest.raises(ConfigError, match="a delta merges over its own base"):
        merge(cfg, fam / "y", progress=False)
    assert not (fam / "y").exists()


def test_delta_without_base_model_is_refused(fam):
    cfg = merge_config_from_dict({"merge_method": "linear",
                                  "models": [{"model": str(fam / "d0.delta.safetensors")},
                                             {"model": str(fam / "d1.delta.safetensors")}]})
    with pytest.raises(ConfigError, match="set base_model"):
        merge(cfg, fam / "z", progress=False)
