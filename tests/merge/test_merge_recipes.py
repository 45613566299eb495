"""Every example in recipes/merge/ is a valid merge config (paths swapped for tiny checkpoints)."""

from pathlib import Path

import pytest
import torch
import yaml

from moe.config import ModelConfig, MoEConfig
from moe.io.checkpoint import make_meta, save_checkpoint
from moe.merge import merge, merge_config_from_dict
from moe.model.transformer import Transformer

RECIPES = sorted((Path(__file__).parents[2] / "recipes" / "merge").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_merge_recipe_is_valid_and_runs(path, tmp_path):
    raw = yaml.safe_load(path.read_text())
    moe = MoEConfig(experts=["text", "code", "dna"], top_k=2) if raw.get("expert") else MoEConfig()
    cfg = ModelConfig(size="debug", moe=moe)
    seed_meta = make_meta()

    def ckpt(name: str, seed: int) -> str:
        torch.manual_seed(seed)
        meta = make_meta(base_id=seed_meta["base_id"], family=None if moe.experts else "code")
        return str(save_checkpoint(tmp_path / name, Transformer(cfg).state_dict(), cfg, meta))

    if "base_model" in raw:
        raw["base_model"] = ckpt("base", 0)
    for i, m in enumerate(raw["models"]):
        m["model"] = ckpt(f"m{i}", i + 1)
    raw["out"] = str(tmp_path / "out")
    out = merge(merge_config_from_dict(raw, str(path)), progress=False)
    assert (out / "model.safetensors").is_file()
