import json

import pytest
import torch

from moe.config import ModelConfig
from moe.io.checkpoint import (
    CheckpointError,
    load_checkpoint,
    make_meta,
    save_checkpoint,
)


def _save(path, **kw):
    sd = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4)}
    return save_checkpoint(path, sd, ModelConfig(), make_meta(), **kw), sd


def test_round_trip_and_lineage_fields(tmp_path):
    p, sd = _save(tmp_path / "ck")
    ck = load_checkpoint(p)
    assert set(ck.state_dict) == {"a", "b"}
    torch.testing.assert_close(ck.state_dict["a"], sd["a"])
    for k in ("id", "parents", "base_id", "family", "tokens_seen", "train_flops", "sha256"):
        assert k in ck.meta
    assert ck.meta["base_id"] == ck.meta["id"]
    assert ck.config.size == "debug"
    assert not list(tmp_path.glob(".ck.tmp-*"))


def test_existing_is_refused_without_overwrite(tmp_path):
    p, _ = _save(tmp_path / "ck")
    before = (p / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        _save(tmp_path / "ck")
    assert (p / "model.safetensors").read_bytes() == before
    _save(tmp_path / "ck", overwrite=True)
    assert not list(tmp_path.glob(".ck.old-*"))


def test_truncated_weights_named_on_load(tmp_path):
    p, _ = _save(tmp_path / "ck")
    w = p / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="model.safetensors: sha256 mismatch"):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_checkpoint(p, verify=False)


def test_missing_and_corrupted_files(tmp_path):
    p, _ = _save(tmp_path / "ck")
    (p / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupted JSON"):
        load_checkpoint(p)
    (p / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")


def test_config_with_unknown_key_is_refused(tmp_path):
    p, _ = _save(tmp_path / "ck")
    cfg = json.loads((p / "config.json").read_text())
    cfg["bogus"] = 1
    (p / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="bogus"):
        load_checkpoint(p)
