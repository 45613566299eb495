"""Number and table formatting for the study reports.

Conventions: bits per byte with 3 decimals; differences are "this arm minus the reference", so a
negative Δbpb is better; negative signs are the typographic minus (U+2212). A missing or
non-finite value formats as "-".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from moe.eval.stats import format_mean_ci as stats_format_mean_ci
from moe.eval.stats import format_number

MINUS = "\u2212"
TIE = 1e-9  # bpb differences below this are float noise: no arm "beats" another by them


def is_num(x: Any) -> bool:
    """A finite int or float (bools are not numbers here)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def format_num(x: Any, digits: int = 3) -> str:
    """A fixed-point number, or "-" when missing / not finite."""
    return format_number(x, digits, minus=MINUS) if is_num(x) else "-"


def format_delta(x: Any, digits: int = 3) -> str:
    """A signed difference: "+0.050", "−0.312"; a tiny loss keeps its sign ("−0.000")."""
    # |x| < TIE: float noise from subtracting equal numbers must not read as a gain
    return format_number(x, digits, signed=True, minus=MINUS, tie=TIE) if is_num(x) else "-"


def format_pct(x: Any, digits: int = 1) -> str:
    """A signed percentage: "−4.4%"."""
    return format_delta(x, digits) + "%" if is_num(x) else "-"


def format_flops(x: Any) -> str:
    """Scientific notation without the exponent's sign clutter: 1.23e12 (0 stays "0")."""
    if not is_num(x):
        return "-"
    if x == 0:
        return "0"
    mant, exp = f"{x:.2e}".split("e")
    return f"{mant}e{int(exp)}".replace("-", MINUS)


def format_count(x: Any) -> str:
    """An integer count with thousands separators: 812,345."""
    return f"{int(x):,}" if is_num(x) else "-"


def format_seconds(x: Any) -> str:
    """Wall time: seconds below 2 minutes, otherwise "8m 32s" / "1h 05m"."""
    if not is_num(x):
        return "-"
    if x < 120:
        return f"{x:.1f} s"
    m, s = divmod(int(round(x)), 60)
    if m < 60:
        return f"{m}m {s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m"


def _mean_ci(mean: Any, half: Any, digits: int, signed: bool, single: str) -> str:
    """`moe.eval.stats.format_mean_ci` in this report's style: typographic minus, "-" for a
    missing or non-finite number (a non-finite mean: the whole text)."""
    if not is_num(mean):
        return "-"
    if half is not None and not is_num(half):
        half = math.nan  # written "-"
    return stats_format_mean_ci(mean, half, digits, signed=signed, minus=MINUS, tie=TIE,
                                missing="-", single=single, undefined="-",
                                drop_nan_half=False)  # fmt: skip


def format_mean_std(mean: Any, std: Any, digits: int = 3, signed: bool = False) -> str:
    """ "2.104 ± 0.012"; the std reads "-" with a single seed."""
    return _mean_ci(mean, std, digits, signed, " ± -")


def format_mean_ci(mean: Any, half: Any, digits: int = 3, signed: bool = False) -> str:
    """ "2.104 ± 0.031" (mean ± confidence-interval half-width); "2.104 (n=1, no CI)" when `half`
    is None, i.e. a single seed; a half-width that is not finite reads "-"."""
    return _mean_ci(mean, half, digits, signed, " (n=1, no CI)")


def bold(s: str) -> str:
    return f"**{s}**" if s != "-" else s


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]],
                 align: Sequence[str] | None = None) -> str:
    """A GitHub markdown table; align is one of "l"/"r" per column (default: first left)."""
    headers = list(headers)
    if align is None:
        align = ["l"] + ["r"] * (len(headers) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def routing_accuracy_lines(rows: Sequence[tuple[str, dict[str, float]]]) -> list[str]:
    """Markdown lines for top-1 routed ensembles (c-BTM): the share of each domain's held-out
    tokens its router sends to that domain's own expert. `rows`: (arm label, {domain: share})."""
    out = []
    for label, acc in rows:
        cells = ", ".join(f"{d} {100 * v:.1f}%" for d, v in acc.items())
        out += [f"Router of {label} (tf-idf centroids of each expert's training data, top-1): "
                f"the share of each domain's held-out tokens sent to that domain's expert: "
                f"{cells}.", ""]
    return out
