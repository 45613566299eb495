"""argparse types of the options: finite floats and bounded integers, and the one-line form of
an error message."""

from __future__ import annotations

import argparse


def finite_float(text: str) -> float:
    """The type of every float option: a number, never NaN or infinity (argparse's `float`
    takes "nan" and "inf", which no option means)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def int_in(lo: int, hi: int):
    """An argparse type: an integer in [lo, hi]. Python's `int` takes any size, and a count of
    2^63 or a seed of 10^30 would otherwise fail deep inside torch or numpy, or run for hours."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {value}")
        return value

    parse.kind = int  # what the option fuzzer (tests/test_fuzz.py) feeds it
    return parse


FLOAT = finite_float
INT32_MAX = 2**31 - 1
COUNT0 = int_in(0, INT32_MAX)  # counts that may be 0 (steps, layers removed, ...)
COUNT1 = int_in(1, INT32_MAX)  # sizes and counts of at least one
SEED = int_in(0, 2**32 - 1)  # what numpy, torch and Python's random all accept


def _one_line(msg: str, limit: int = 1000) -> str:
    """An error message as one line of at most `limit` characters: a message quoting user input
    (a key, a value, a file's text) never floods the terminal."""
    msg = " ".join(line.strip() for line in msg.splitlines() if line.strip())
    return msg if len(msg) <= limit else f"{msg[:limit]}... ({len(msg) - limit} more characters)"
