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


def test_nothing_named_kernels_is_importable_from_the_repository_root():
    """`kernels` is a Hugging Face package that transformers imports: a `kernels/__init__.py`
    (or `kernels.py`) at the root would shadow it for any `python` started there."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert not (REPO / "kernels.py").exists()
    assert (REPO / "kernels" / "moe_kernels" / "__init__.py").is_file()


def test_transformers_llama_imports_from_the_repository_root():
    """The README's test command runs from the root: transformers' Llama must import there, and
    `kernels`, where installed, must be Hugging Face's, not a folder of this repository."""
    import subprocess
    import sys

    pytest.importorskip("transformers")
    code = (
        "import importlib.util, pathlib, sys\n"
        "import transformers.models.llama.modeling_llama\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "ours = pathlib.Path.cwd().resolve() / 'kernels'\n"
        "if spec is not None and spec.origin is not None:\n"
        "    assert ours not in pathlib.Path(spec.origin).resolve().parents, spec.origin\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
