"""tools/bench_generate.py runs end to end (tiny sizes, no timing asserts) and both sides
produce the same tokens."""

import json

import pytest
from helpers import load_tool

pytest.importorskip("transformers")


def _load():
    return load_tool("bench_generate")


def test_bench_generate_runs_and_tokens_match(tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = ["--sizes", "32x1", "--new-tokens", "6", "--prompt-tokens", "5", "--repeats", "1",
            "--no-cache-row", "--json", str(out)]  # fmt: skip
    assert _load().main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["same_tokens"] and rows[0]["new_tokens"] == 6
    assert "| random Llama (dim 32, 1 layers" in capsys.readouterr().out
