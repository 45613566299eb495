"""What `pip install .` (a wheel, not the editable install CI uses) ships: every package folder
of moe/ and kernels/ is listed in pyproject.toml, so none is left out of the wheel."""

import pytest
from helpers import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = set()
    for name, folder in cfg["package-dir"].items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            on_disk.add(".".join((name, *rel.parts)))
    assert on_disk - listed == set(), f"package folders not in pyproject.toml: {on_disk - listed}"
    assert listed - on_disk == set(), f"listed but not on disk: {listed - on_disk}"
