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
    # not a model's tensors: these tests load with check=False (the file format alone)
    sd = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4)}
    return save_checkpoint(path, sd, ModelConfig(), make_meta(), **kw), sd


def test_round_trip_and_lineage_fields(tmp_path):
    p, sd = _save(tmp_path / "ck")
    ck = load_checkpoint(p, check=False)
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
    ck = load_checkpoint(p, check=False)
    assert torch.equal(ck.state_dict["a"], sd["a"])
    assert not list(tmp_path.glob(".ck.old-*"))
    # and a kill after the second rename: the leftover old copy is removed
    import shutil

    shutil.copytree(p, tmp_path / ".ck.old-99998")
    load_checkpoint(p, check=False)
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
        ck = load_checkpoint(target, check=False)  # verifies sha256: a torn write would fail here
        assert ck.state_dict["w"].unique().numel() == 1
        assert float(ck.state_dict["w"][0, 0]) == ck.meta["step"]
        assert not list(tmp_path.glob(".ck.tmp-*"))


# ---------------------------------------------------------------------------- config vs weights

SMALL = ModelConfig(size="debug", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                    max_seq_len=32)  # fmt: skip


def _moe(**kw):
    import dataclasses

    from moe.config import MoEConfig

    return dataclasses.replace(SMALL, moe=MoEConfig(experts=["a", "b", "c"], **kw))


def _with(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


@pytest.mark.parametrize("weights_cfg, config, message", [
    (SMALL, _with(SMALL, dim=64), "dim is 64 but the weights are 32 wide (tok_emb.weight has "
     "shape (259, 32), config says (259, 64))"),
    (SMALL, _with(SMALL, vocab_size=300), "vocab_size is 300 but the weights have 259 token rows"),
    (SMALL, _with(SMALL, n_layers=3), "n_layers is 3 but the weights have 2 layers"),
    (SMALL, _with(SMALL, n_layers=1), "n_layers is 1 but the weights have 2 layers"),
    (SMALL, _with(SMALL, n_kv_heads=4), "n_kv_heads x head size (dim / n_heads) is 4 x 8 = 32 "
     "but the weights have 16 key/value channels"),
    (SMALL, _with(SMALL, head_dim=4), "n_heads x head size (head_dim) is 4 x 4 = 16 but the "
     "weights have 32 query channels"),
    (SMALL, _with(SMALL, ffn_dim=64), "ffn_dim is 64 but the weights have 48 FFN neurons "
     "(layers.0.ffn.w1.weight has shape (48, 32), config says (64, 32))"),
    (SMALL, _with(SMALL, tie_embeddings=True), "tie_embeddings is true but the weights have "
     "lm_head"),
    (_with(SMALL, tie_embeddings=True), SMALL, "tie_embeddings is false but the weights have no "
     "lm_head"),
    (SMALL, _with(SMALL, qkv_bias=True), "qkv_bias is true but the weights have no q/k/v biases"),
    (SMALL, _moe(), "moe.experts lists 3 experts but the weights hold a dense FFN"),
    (_moe(), SMALL, "moe.experts is empty (a dense model) but the weights hold an MoE FFN"),
    (_moe(), _with(_moe(), moe=_moe().moe.__class__(experts=["a", "b"])),
     "moe.experts lists 2 experts but the weights have 3 (layers.0.ffn.w1 has shape "
     "(3, 32, 48), config says (2, 32, 48))"),
    (_moe(), _moe(expert_ffn_dim=24), "moe.expert_ffn_dim is 24 but the weights have 48 neurons "
     "per expert"),
    (_moe(), _moe(router="domain"), "moe.router is domain but the weights have a learned router"),
    (_moe(router="domain"), _moe(), "moe.router is learned but the weights have no learned "
     "router"),
    (_moe(), _moe(shared_expert_ffn_dim=16), "moe.shared_expert_ffn_dim is 16 but the weights "
     "have no shared expert"),
    (_moe(shared_expert_ffn_dim=16), _moe(shared_expert_ffn_dim=8), "moe.shared_expert_ffn_dim "
     "is 8 but the weights have a shared expert of 16 neurons"),
])  # fmt: skip
def test_weights_checked_against_config(tmp_path, weights_cfg, config, message):
    """Every load names the config.json field that disagrees with the weights' shapes."""
    from moe.io.checkpoint import check_weights, load_model
    from moe.model.transformer import Transformer

    sd = Transformer(weights_cfg).state_dict()
    with pytest.raises(CheckpointError) as e:
        check_weights(sd, config, "CK/config.json")
    assert str(e.value).startswith("CK/config.json: ") and message in str(e.value)
    # the same through the loader every command uses
    p = save_checkpoint(tmp_path / "ck", sd, config, make_meta())
    with pytest.raises(CheckpointError, match="config.json: "):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="config.json: "):
        load_model(p)


def test_unknown_and_missing_tensors_are_named():
    from moe.io.checkpoint import check_weights
    from moe.model.transformer import Transformer

    sd = Transformer(SMALL).state_dict()
    with pytest.raises(CheckpointError, match="the weights hold extra.bias that the config"):
        check_weights({**sd, "extra.bias": torch.zeros(2)}, SMALL, "CK")
    sd.pop("norm.weight")
    with pytest.raises(CheckpointError, match="the weights lack norm.weight"):
        check_weights(sd, SMALL, "CK")


def test_check_reads_shapes_and_an_invalid_config_is_one_error():
    from moe.io.checkpoint import check_weights, expected_shapes

    shapes = expected_shapes(SMALL)
    assert shapes["tok_emb.weight"] == (259, 32)
    check_weights(shapes, SMALL, "CK")  # shapes alone (a file's header) are enough
    with pytest.raises(CheckpointError, match="CK: model.n_layers must be at least 1"):
        check_weights(shapes, _with(SMALL, n_layers=0), "CK")


def test_load_model_builds_the_model_of_a_run_directory(tmp_path):
    from moe.io.checkpoint import load_model
    from moe.model.transformer import Transformer

    m = Transformer(SMALL)
    save_checkpoint(tmp_path / "run" / "model", m.state_dict(), m.config, make_meta())
    model, meta, tok, path = load_model(tmp_path / "run")
    assert path == tmp_path / "run" / "model" and meta["id"]
    assert tok.kind == "byte"  # the byte vocabulary: the byte tokenizer, though none was written
    for k, v in m.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_merge_inputs_are_checked_too(tmp_path):
    """A merge streams its inputs without load_checkpoint: the header's shapes are checked."""
    from moe.io.sources import open_source
    from moe.model.transformer import Transformer

    m = Transformer(SMALL)
    p = save_checkpoint(tmp_path / "ck", m.state_dict(), _with(SMALL, ffn_dim=64), make_meta())
    with pytest.raises(CheckpointError, match="ffn_dim is 64 but the weights have 48"):
        open_source(p)
