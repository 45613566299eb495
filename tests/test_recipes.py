"""Every recipe shipped in recipes/ loads and validates (merge configs by their own schema)."""

from pathlib import Path

import pytest
from helpers import REPO

from moe.config import load_recipe
from moe.model.flops import count_params

RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "merge" not in p.parts)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_recipe_validates(path: Path):
    r = load_recipe(path)
    assert count_params(r.model).total > 0
    assert r.data.seq_len <= r.model.resolved().max_seq_len


def test_there_are_recipes_of_each_kind():
    names = {str(p.relative_to(REPO / "recipes")) for p in RECIPES}
    for want in ("debug/dense.yaml", "debug/branch.yaml", "debug/joint.yaml", "debug/router.yaml",
                 "quickstart.yaml", "small/study.yaml", "cluster/branch.yaml"):
        assert want in names
