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

pytestmark = pytest.mark.reliability  # atomic writes, recovery, sha256 (docs/reliability.md)


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


def test_interrupted_overwrite_is_recovered(tmp_path):
    import os

    p, sd = _save(tmp_path / "ck")
    # simulate a kill between the two renames of an overwrite: old moved aside, new not in place
    os.replace(p, tmp_path / ".ck.old-99999")
    ck = load_checkpoint(p)
    assert torch.equal(ck.state_dict["a"], sd["a"])
    assert not list(tmp_path.glob(".ck.old-*"))
    # and a kill after the second rename: the leftover old copy is removed
    import shutil

    shutil.copytree(p, tmp_path / ".ck.old-99998")
    load_checkpoint(p)
    assert not list(tmp_path.glob(".ck.old-*"))


def test_kill_at_any_moment_leaves_old_or_new(tmp_path):
    """SIGKILL a process that keeps overwriting one checkpoint; it always loads afterwards."""
    import random
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys, torch\n"
        "from moe.config import ModelConfig\n"
        "from moe.io.checkpoint import save_checkpoint, make_meta\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1\n"
        "    sd = {'w': torch.full((256, 256), float(i))}\n"
        "    save_checkpoint(sys.argv[1], sd, ModelConfig(), make_meta(step=i), overwrite=True)\n"
    )
    target = tmp_path / "ck"
    rng = random.Random(0)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", script, str(target)])
        deadline = time.time() + 120
        while not target.exists() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ck = load_checkpoint(target)  # verifies sha256: a torn write would fail here
        assert ck.state_dict["w"].unique().numel() == 1
        assert float(ck.state_dict["w"][0, 0]) == ck.meta["step"]
        assert not list(tmp_path.glob(".ck.tmp-*"))
