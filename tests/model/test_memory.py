"""The memory estimate that refuses sizes which cannot fit, before anything is allocated."""

import pytest
from helpers import DEBUG

from moe.config import ConfigError, ModelConfig
from moe.model import flops
from moe.model.flops import GIB, check_memory, count_params, memory_needed

CFG = ModelConfig(size="debug")


def test_needed_is_the_parameters_times_their_bytes():
    n = count_params(CFG).total
    assert memory_needed(CFG) == 4 * n
    assert memory_needed(CFG, training=True) == 16 * n  # weights, gradients, two AdamW moments
    assert memory_needed(CFG, training=True, bytes_per_param=2) == 8 * n


def test_available_memory_is_read():
    have = flops.available_memory()
    if have is not None:  # /proc/meminfo (Linux) or psutil
        assert have[0] > 0 and isinstance(have[1], str)


def test_refused_in_one_line_naming_size_and_what_is_available(monkeypatch):
    monkeypatch.setattr(flops, "available_memory", lambda device="cpu": (2 * GIB, "available"))
    big = ModelConfig(size="debug", dim=4096, n_layers=8, n_heads=32, n_kv_heads=32,
                      ffn_dim=16384)  # fmt: skip
    with pytest.raises(ConfigError) as e:
        check_memory(big, "model", training=True)
    msg = str(e.value)
    assert msg.startswith("model: ") and "\n" not in msg
    assert "(dim 4096, 8 layers, ffn 16384, vocab 259)" in msg
    assert "to train" in msg and "but 2.0 GiB is available" in msg
    check_memory(CFG, "model", training=True)  # a small model passes
    monkeypatch.setattr(flops, "available_memory", lambda device="cpu": None)
    check_memory(big, "model", training=True)  # unknown: never refused


def test_refused_before_training_allocates(monkeypatch, tmp_path):
    """`moe train` refuses a model larger than memory before building it, and writes nothing."""
    from moe.cli import main

    monkeypatch.setattr(flops, "available_memory", lambda device="cpu": (GIB // 1024, "free"))
    out = tmp_path / "run"
    rc = main(["train", str(DEBUG / "dense.yaml"), f"out_dir={out}", "trainer.max_steps=1",
               "model.dim=512", "model.n_heads=8", "model.n_kv_heads=8", "model.ffn_dim=2048",
               "trainer.accelerator=cpu"])  # fmt: skip
    assert rc == 2
    assert not (out / "model").exists()


def test_grow_target_is_sized_from_the_config():
    from moe.surgery.grow import GrowSpec, grown_config

    c = CFG.resolved()
    g = grown_config(c, GrowSpec(ffn_dim=256, dim=128, kv_heads=4, duplicate=(0, 2)))
    assert (g.ffn_dim, g.dim, g.n_kv_heads, g.n_heads, g.n_layers) == (256, 128, 4, 8, 4)
    assert g.head_size() == c.head_size()


def test_split_by_copy_is_refused_when_its_experts_cannot_fit(monkeypatch, tmp_path, capsys):
    """Copying the FFN into E experts needs E times its weights beside the dense model: sized
    from config.json before the dense weights are read."""
    from generate_fixtures import save_tiny

    from moe.cli import main

    dense = save_tiny(tmp_path / "dense")
    need = {}

    def have(device="cpu"):
        return (need["bytes"], "available")

    monkeypatch.setattr(flops, "available_memory", have)
    from moe.io.checkpoint import read_config

    cfg = read_config(dense)
    need["bytes"] = 2 * memory_needed(cfg)  # room for the dense model and one more copy
    assert main(["split", str(dense), "--experts", "a,b,c,d", "--out",
                 str(tmp_path / "moe")]) == 2
    err = capsys.readouterr().err
    assert "split into 4 experts" in err and " GiB is available" in err
    assert not (tmp_path / "moe").exists()
    need["bytes"] = 100 * memory_needed(cfg)
    assert main(["split", str(dense), "--experts", "a,b", "--out", str(tmp_path / "moe")]) == 0
