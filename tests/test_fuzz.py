"""Property-based fuzzing (hypothesis) of the two ways a user hands moe-forge values: recipe keys
and command-line options.

Properties:
- recipe schema: for every key of `Recipe` (sections, lists and scalars alike) and any hostile
  value (wrong type, NaN/inf, negative, zero, overflow, empty, huge, broken YAML), loading the
  recipe either succeeds or raises ConfigError (one line, exit 2 at the CLI); a NaN or inf is never
  accepted.
- sizes: a model or batch too large for this machine's memory is refused in one line before
  anything is allocated.
- CLI options: every int/float option of every command (found from the argument parser, so a new
  option is fuzzed without a line here), given a hostile value, exits 0 or 2; 2 with exactly one
  `moe: error:` line and no traceback; non-numbers and NaN/inf always 2; no input changes; and no
  value makes a command run for minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import shutil
import signal
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
from bad_input_cases import DEBUG, QUIET, build_fixtures, last_line, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe.config import ConfigError, Recipe, load_recipe

pytestmark = pytest.mark.reliability

def fuzz(n: int) -> settings:
    """Deterministic runs (same examples every time, no example database on disk)."""
    return settings(
        max_examples=n, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# ----------------------------------------------------------------------------- recipe schema


def _leaf_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass schema: sections and their fields."""
    out = []
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        out.append(key)
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        for a in args:
            if is_dataclass(a):
                out.extend(_leaf_keys(a, key + "."))
    return out


KEYS = _leaf_keys(Recipe)

HOSTILE = st.sampled_from([
    "nan", ".nan", "inf", "-inf", ".inf", "-.inf", "-1", "-1e9", "0", "0.0", "1e400", "-1e400",
    str(2**63), str(2**64), str(10**30), "''", "", "null", "[]", "{}", "[1, 2]", "{a: 1}",
    "abc", "true", "[", "{", "]", "'unterminated", "1e39", "-0", "${nope}", "${name}",
]) | st.integers(min_value=-(2**70), max_value=2**70).map(str) | st.floats(
    allow_nan=True, allow_infinity=True).map(repr)


@fuzz(400)
@given(key=st.sampled_from(KEYS), value=HOSTILE)
def test_any_value_for_any_recipe_key_loads_or_is_refused_in_one_line(key, value):
    try:
        recipe = load_recipe(DEBUG / "dense.yaml", [f"{key}={value}"])
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg.strip(), msg
        assert "Traceback" not in msg
        return
    # accepted: it must not carry a non-finite number anywhere
    def walk(obj, path=""):
        if isinstance(obj, float):
            assert math.isfinite(obj), f"{key}={value} accepted: {path} = {obj}"
        elif is_dataclass(obj):
            for f in fields(obj):
                walk(getattr(obj, f.name), f"{path}.{f.name}")
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]")

    walk(recipe)


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _cli(argv: list[str], limit_s: int = 60) -> tuple[int, str]:
    """Run `moe ARGV` in this process: (exit code, stderr). Fails past `limit_s` seconds, and
    past 6 GiB more address space (so a value that allocates without limit fails the test instead
    of exhausting the machine)."""
    import resource

    from moe.cli import main

    def too_long(*_):
        raise TimeoutError(f"`moe {' '.join(argv)}` ran for more than {limit_s} s")

    err = io.StringIO()
    old = signal.signal(signal.SIGALRM, too_long)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _address_space() + (6 << 30)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    signal.alarm(limit_s)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse
                rc = e.code if isinstance(e.code, int) else 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return rc, err.getvalue()


def _check_refusal(rc: int, err: str, what: str) -> None:
    assert rc == 2, f"{what}: exit {rc}\n{err[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    line = last_line(err)
    assert line.startswith("moe: error: "), err[-2000:]
    assert [ln for ln in err.splitlines() if ln.startswith("moe:")] == [line], err[-2000:]


# far beyond any machine: 10^8-wide layers, 10^8 layers, a 10^8-token vocabulary or batch
HUGE = [("model.dim", "model.n_heads=1 model.n_kv_heads=1"), ("model.n_layers", ""),
        ("model.ffn_dim", ""), ("model.vocab_size", ""), ("data.batch_size", "")]


@pytest.mark.parametrize("key,extra", HUGE, ids=[k for k, _ in HUGE])
def test_a_model_too_large_for_memory_is_refused_before_allocating(key, extra, tmp_path):
    """Run with an 8 GiB address-space limit, so a missing check fails this test (an allocation
    error) instead of exhausting the machine."""
    import os
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    out = tmp_path / "run"
    argv = ["train", str(DEBUG / "dense.yaml"), f"out_dir={out}", QUIET, "trainer.max_steps=1",
            f"{key}={10**8}", *extra.split()]
    p = subprocess.run([sys.executable, "-m", "moe.cli", *argv], capture_output=True, text=True,
                       preexec_fn=limit, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    _check_refusal(p.returncode, p.stderr, f"{key}=10^8")
    assert " GiB is available" in last_line(p.stderr), last_line(p.stderr)
    assert not (out / "model").exists()


# ----------------------------------------------------------------------------- CLI options


def _numeric_options() -> list[tuple[tuple[str, ...], str, type]]:
    """(command path, option, type) for every int/float option of the `moe` parser."""
    from moe.cli import build_parser, finite_float

    out = []

    def walk(p: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    walk(sp, path + (name,))
            elif a.option_strings and a.type is finite_float:
                out.append((path, a.option_strings[-1], float))
            elif a.option_strings and (a.type is int or getattr(a.type, "kind", None) is int):
                out.append((path, a.option_strings[-1], int))

    walk(build_parser(), ())
    return out


def _base_argv(path: tuple[str, ...], fx: dict[str, Path]) -> list[str] | None:
    """A valid command line for each command (None: recipe-driven, fuzzed through the schema)."""
    out = str(fx["tmp"] / "out")
    dense, moe_ck = str(fx["dense"]), str(fx["moe"])
    return {
        ("eval",): ["eval", dense, "--max-docs", "1", "--json", str(fx["tmp"] / "e.json")],
        ("split",): ["split", dense, "--experts", "text,code", "--out", out],
        ("init",): ["init", "--from", dense, "--method", "standard", "--out", out],
        ("importance",): ["importance", dense, "--domains", "text", "--batches", "1",
                          "--out", str(fx["tmp"] / "scores.safetensors")],
        ("prune",): ["prune", dense, "--out", out, "--ffn", "0.25", "--batches", "1"],
        ("grow",): ["grow", dense, "--out", out, "--ffn-dim", "128"],
        ("shrink",): ["shrink", dense, "--out", out, "--ffn", "0.25"],
        ("retokenize",): None,  # trains a BPE tokenizer on the corpora: covered by its tests
        ("assemble",): ["assemble", *[str(b) for b in fx["branches"]], "--out", out],
        ("experts",): ["experts", moe_ck, "--drop", "dna", "--out", out],
        ("delta", "compress"): ["delta", "compress", str(fx["delta"]), "topk:0.5",
                                "-o", str(fx["tmp"] / "c.delta.safetensors")],
        ("delta", "apply"): ["delta", "apply", str(fx["dense"]), str(fx["delta"]), "-o", out],
        ("generate",): ["generate", moe_ck, "--prompt", "ab", "--max-new-tokens", "2",
                        "--json", str(fx["tmp"] / "g.json")],
    }.get(path)


OPTIONS = _numeric_options()
OPTION_VALUES = {
    int: st.sampled_from(["-1", "0", str(2**31), str(2**63), str(10**30), "abc", "1.5", "",
                          "nan"]),
    float: st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e39", "1e300", "-1e300", "abc",
                            "", "1e-320"]),
}


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    from moe.cli import main

    fx = build_fixtures(tmp_path_factory.mktemp("fuzz"))
    fx["branches"] = [fx["branch_text"], fx["branch_code"]]
    fx["delta"] = fx["tmp"].parent / "fuzz.delta.safetensors"
    assert main(["delta", "extract", str(fx["dense"]), str(fx["branch_text"]), "-o",
                 str(fx["delta"])]) == 0
    return fx


FUZZED = [(p, o, t) for p, o, t in OPTIONS if p not in {("run",), ("sweep",), ("retokenize",)}]


@fuzz(500)
@given(data=st.data())
def test_any_value_for_any_option_exits_0_or_2_in_one_line(fx, data):
    path, option, typ = data.draw(st.sampled_from(FUZZED), label="option")
    value = data.draw(OPTION_VALUES[typ], label="value")
    shutil.rmtree(fx["tmp"], ignore_errors=True)
    fx["tmp"].mkdir(parents=True)
    base = _base_argv(path, fx)
    assert base is not None, f"no base command line for `moe {' '.join(path)}`: add one"
    # the option's value replaces the base's own, if the base sets it
    argv = list(base)
    if option in argv:
        i = argv.index(option)
        del argv[i:i + 2]
    argv += [f"{option}={value}"]
    before = snapshot(fx["tmp"].parent)
    rc, err = _cli(argv, limit_s=90)
    what = f"moe {' '.join(path)} {option}={value!r}"
    not_a_number = value in ("abc", "", "1.5") or (typ is int and value == "nan")
    non_finite = typ is float and value in ("nan", "inf", "-inf")
    if not_a_number or non_finite:
        _check_refusal(rc, err, what)
    else:
        assert rc in (0, 2), f"{what}: exit {rc}\n{err[-3000:]}"
        assert "Traceback" not in err, f"{what}\n{err[-3000:]}"
        if rc == 2:
            _check_refusal(rc, err, what)
    after = snapshot(fx["tmp"].parent)
    assert [k for k in before if after.get(k) != before[k]] == [], f"{what} changed an input"
