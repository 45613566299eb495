"""moe/config/registry.py: the one registry shape, and every user-facing list read from one."""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

import pytest

from moe.cli import build_parser
from moe.config import ConfigError
from moe.config.registry import Registry


def test_register_as_decorator_or_call_and_read_back():
    reg: Registry[object] = Registry("widget")

    @reg.register("b")
    def b():
        return 2

    reg.register("a", 1)
    assert reg["a"] == 1 and reg.get("b") is b and reg.get("zzz", None) is None
    assert reg.names() == ["a", "b"] and list(reg) == ["a", "b"] and len(reg) == 2
    assert "a" in reg and "c" not in reg
    assert reg.items() == [("a", 1), ("b", b)] and reg.values() == [1, b]


def test_a_duplicate_or_empty_name_is_refused():
    reg: Registry[int] = Registry("merge method")
    reg.register("ties", 1)
    with pytest.raises(ValueError, match="merge method 'ties' registered twice"):
        reg.register("ties", 2)
    with pytest.raises(ValueError, match="registered twice"):
        reg["ties"] = 3
    with pytest.raises(ValueError, match="empty"):
        reg.register("", 4)
    assert reg["ties"] == 1


def test_an_unknown_name_lists_the_choices():
    reg: Registry[int] = Registry("split method")
    reg.register("copy", 1)
    reg.register("random", 2)
    with pytest.raises(ConfigError,
                       match=r"^unknown split method 'knn'; choose one of copy, random$"):
        reg["knn"]
    named: Registry[int] = Registry("merge method", field="merge_method", noun="method")
    named.register("ties", 1)
    with pytest.raises(ConfigError,
                       match=r"^merge_method: unknown method 'soup'; choose one of ties$"):
        named.get("soup")


def test_order_by_name_registration_or_attribute():
    by_name: Registry[int] = Registry("x")
    in_order: Registry[int] = Registry("x", order="registered")
    by_attr: Registry[SimpleNamespace] = Registry("x", order="attribute")
    for name, rank in (("zeta", 1), ("alpha", 3), ("mid", 2), ("beta", 1)):
        by_name.register(name, rank)
        in_order.register(name, rank)
        by_attr.register(name, SimpleNamespace(order=rank))
    assert by_name.names() == ["alpha", "beta", "mid", "zeta"]
    assert in_order.names() == ["zeta", "alpha", "mid", "beta"]
    assert by_attr.names() == ["beta", "zeta", "mid", "alpha"]  # ties broken by name
    assert [n for n, _ in by_attr.items()] == by_attr.names()


def test_discovery_imports_every_public_module_of_the_package_once(tmp_path, monkeypatch):
    pkg = tmp_path / "regpkg_plugins"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from moe.config.registry import Registry\n"
        "REG = Registry('plugin', discover=__name__)\n"
    )
    for name in ("one", "two"):
        (pkg / f"{name}.py").write_text(
            f"from regpkg_plugins import REG\nREG.register({name!r}, {name!r}.upper())\n"
        )
    (pkg / "_private.py").write_text("raise RuntimeError('a private module is not imported')\n")
    (pkg / "sub").mkdir()  # a subpackage is a member too
    (pkg / "sub" / "__init__.py").write_text(
        "from regpkg_plugins import REG\nREG.register('sub', 0)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import regpkg_plugins

        reg = regpkg_plugins.REG
        assert reg._items == {}  # nothing is imported before the registry is read
        assert reg.names() == ["one", "sub", "two"] and reg["two"] == "TWO"
        (pkg / "three.py").write_text("from regpkg_plugins import REG\nREG.register('three', 3)\n")
        assert "three" not in reg  # discovery runs once
    finally:
        for mod in [m for m in sys.modules if m.split(".")[0] == "regpkg_plugins"]:
            del sys.modules[mod]


def test_a_module_failing_on_import_fails_the_read_and_the_next_read_retries(tmp_path, monkeypatch):
    pkg = tmp_path / "regpkg_broken"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from moe.config.registry import Registry\nREG = Registry('plugin', discover=__name__)\n"
    )
    (pkg / "bad.py").write_text("raise RuntimeError('broken plugin')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import regpkg_broken

        for _ in range(2):
            with pytest.raises(RuntimeError, match="broken plugin"):
                regpkg_broken.REG.names()
    finally:
        for mod in [m for m in sys.modules if m.split(".")[0] == "regpkg_broken"]:
            del sys.modules[mod]


def test_monkeypatch_can_add_a_temporary_member(monkeypatch):
    reg: Registry[int] = Registry("x")
    reg.register("a", 1)
    with monkeypatch.context() as m:
        m.setitem(reg, "b", 2)
        assert reg.names() == ["a", "b"]
    assert reg.names() == ["a"]


# ----------------------------------------------------------------------------- the registries


def test_every_registry_finds_its_members():
    from moe.delta.registry import STEPS
    from moe.experiments import EXPERIMENTS
    from moe.experiments.study.arms import ARMS
    from moe.merge.registry import METHODS as MERGE
    from moe.model.init_dist import METHODS as INIT
    from moe.model.split import SPLIT_METHODS, SPLITS

    assert MERGE.names() == ["breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties",
                             "della", "della_linear", "karcher", "linear", "model_stock",
                             "multislerp", "nearswap", "nuslerp", "passthrough", "sce", "slerp",
                             "task_arithmetic", "ties"]  # fmt: skip
    assert set(STEPS) == {"topk", "dare", "lowrank", "int8", "int4", "bitdelta", "fp16"}
    assert SPLITS.names() == ["copy", "random", "kmeans", "activation"] == list(SPLIT_METHODS)
    assert set(INIT) == {"standard", "gaussian", "histogram", "shuffle", "spectrum", "select",
                         "trained"}  # fmt: skip
    assert set(EXPERIMENTS) == {"init_study", "surgery", "fleet", "prune"}
    assert EXPERIMENTS["fleet"].module == "moe.experiments.fleet.study"
    names = ARMS.names()  # the report's order: the experts first, the seed last
    assert names[0] == "btx" and names[-2:] == ["seed", "trimmed"]
    assert names.index("monolith") < names.index("btm")


def _subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _option(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    return next(a for a in parser._actions if a.dest == dest)


def test_cli_choices_and_help_lists_are_the_registries():
    from moe.delta.registry import STEPS, usage
    from moe.experiments import EXPERIMENTS
    from moe.merge.registry import METHODS as MERGE
    from moe.model.init_dist import METHODS as INIT
    from moe.model.split import SPLITS

    p = build_parser()
    split = _option(_subparser(p, "split"), "method")
    assert list(split.choices) == SPLITS.names()
    assert ", ".join(SPLITS.names()) in _subparser(p, "split").format_help().replace("\n ", " ")
    assert list(_option(_subparser(p, "init"), "method").names) == INIT.names()
    assert list(_option(_subparser(p, "merge"), "config").names) == MERGE.names()
    compress = _option(_subparser(p, "delta", "compress"), "method")
    kinds = {k: [n for n, s in STEPS.items() if s.kind == k] for k in ("structure", "values")}
    assert [s.split(":")[0] for s in compress.structure] == kinds["structure"]
    assert list(compress.values) == kinds["values"] == usage("values")
    run_help = " ".join(_subparser(p, "run").format_help().split())
    for section, e in EXPERIMENTS.items():
        assert f"{section}: {' '.join(e.description.split())}" in run_help


def test_moe_help_reads_no_registry():
    """`moe --help` stays fast: the registries (and torch) load only when a list is shown."""
    import subprocess

    code = ("import sys; from moe.cli import main; main(['--help']); "
            "print(sorted(m for m in ('torch', 'moe.model.split', 'moe.merge.registry', "
            "'moe.experiments', 'moe.delta') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_list_arms_prints_the_registry_in_its_order(capsys):
    from moe.cli import main
    from moe.experiments.study.arms import ARMS

    assert main(["run", "--list-arms"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == ARMS.names()


def test_a_bad_split_method_is_refused_by_argparse_with_the_registrys_names(capsys):
    from moe.cli import main

    assert main(["split", "ckpt", "--experts", "a", "--out", "x", "--method", "knn"]) == 2
    assert "'copy', 'random', 'kmeans', 'activation'" in capsys.readouterr().err


def test_a_new_member_shows_up_everywhere_with_no_other_edit(monkeypatch):
    """What one more registered method costs: nothing else (the CLI and checks read it)."""
    from moe.merge.registry import METHODS, MethodSpec, get

    spec = MethodSpec("soup", lambda base, ts, p: ts[0], needs_base=False,
                      normalize_default=False, uses_density=False)  # fmt: skip
    monkeypatch.setitem(METHODS, "soup", spec)
    assert get("soup") is spec
    assert "soup" in _option(_subparser(build_parser(), "merge"), "config").names
