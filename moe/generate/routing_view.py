"""Views of a generation's routing record (moe.generate.generation.Generation): which expert got the
largest routing weight for each token, layer by layer.

- `render_terminal`: the text once per layer, each token on its expert's colour (ANSI 256
  colours), the prompt underlined, a legend and the per-expert share of tokens. Without colour
  it falls back to `render_plain`.
- `render_plain`: plain text for files and markdown: the text, and under it one row of letters
  per layer (the letter of each character's expert).
- `render_html`: one self-contained page (inline CSS, no script, nothing fetched): tokens as
  spans coloured per layer; hovering a token shows every layer's top-k experts and weights.

Tokens are grouped into characters: a character made of several byte tokens is one unit shown
with the routing of its last byte (the hover of the HTML page lists every byte). Newlines show as
⏎ in the terminal and plain views (each row ends at one), tabs as ⇥, other control bytes as their
Unicode control pictures, special tokens as ␂ (BOS), ␃ (EOS), ␀ (PAD).
"""

from __future__ import annotations

import html as _html
import shutil
import unicodedata
from dataclasses import dataclass

from moe.generate.generation import SPECIAL_MARKS, Generation

# Background colours per expert (xterm 256-colour index, and the same colour for HTML): light
# tones, so black text stays readable on all of them
PALETTE = [
    (117, "#87d7ff"),  # light blue
    (215, "#ffaf5f"),  # orange
    (120, "#87ff87"),  # light green
    (218, "#ffafd7"),  # pink
    (228, "#ffff87"),  # yellow
    (147, "#afafff"),  # lavender
    (159, "#afffff"),  # cyan
    (181, "#d7afaf"),  # rose brown
    (193, "#d7ffaf"),  # pale lime
    (223, "#ffd7af"),  # peach
]
BOUNDARY = "▶"


@dataclass
class Unit:
    """One displayed character (or token piece) and the token indices it is made of."""

    text: str  # as typed: may hold newlines
    tokens: list[int]
    prompt: bool

    @property
    def last(self) -> int:
        return self.tokens[-1]


def units(g: Generation) -> list[Unit]:
    out: list[Unit] = []
    pending: list[int] = []
    for i, (piece, sp) in enumerate(zip(g.pieces, g.specials)):
        pending.append(i)
        if sp is not None:
            text = SPECIAL_MARKS[sp]
        elif piece:
            text = piece
        else:
            continue  # a byte inside a character: shown with the character's last byte
        out.append(Unit(text, pending, i < g.prompt_len))
        pending = []
    if pending:
        out.append(Unit("\ufffd", pending, pending[-1] < g.prompt_len))
    return out


def visible(text: str) -> str:
    """Control characters as visible symbols (one cell each)."""
    chars = []
    for ch in text:
        c = ord(ch)
        if ch == "\n":
            chars.append("⏎")
        elif ch == "\t":
            chars.append("⇥")
        elif c < 0x20:
            chars.append(chr(0x2400 + c))
        elif c == 0x7F:
            chars.append("␡")
        else:
            chars.append(ch)
    return "".join(chars)


def cell_width(text: str) -> int:
    """Terminal columns of `text` (wide East Asian characters take two)."""
    w = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        w += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return w


def letters(experts: list[str]) -> list[str]:
    """One distinct character per expert: its first letter when those are distinct, else a
    digit / letter by index."""
    first = [e[:1].lower() or "?" for e in experts]
    if len(set(first)) == len(first):
        return first
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    return [alphabet[i] if i < len(alphabet) else "?" for i in range(len(experts))]


def _cells(g: Generation, marker: bool) -> list[list[tuple[str, Unit | None]]]:
    """Rows of (visible text, unit) cells; a row ends after a newline or at `width` columns
    (the caller wraps). marker: a boundary cell (unit None) where the generated text starts."""
    rows: list[list[tuple[str, Unit | None]]] = [[]]
    started = False
    for u in units(g):
        if marker and not started and not u.prompt:
            rows[-1].append((BOUNDARY, None))
            started = True
        rows[-1].append((visible(u.text), u))
        if "\n" in u.text:
            rows.append([])
    return [r for r in rows if r]


def _wrap(rows, cols: int):
    out = []
    for row in rows:
        cur, w = [], 0
        for cell in row:
            cw = cell_width(cell[0])
            if cur and w + cw > cols:
                out.append(cur)
                cur, w = [], 0
            cur.append(cell)
            w += cw
        if cur:
            out.append(cur)
    return out


def _header(g: Generation, source: str | None) -> list[str]:
    r = g.routing
    assert r is not None
    kind = (
        f"domain router (every token to the expert of domain {g.domain!r})"
        if r.router == "domain"
        else f"learned router, top-{r.top_k}"
    )
    head = f"routing of {source}" if source else "routing"
    return [
        f"{head}: {kind}, {len(r.experts)} experts; {g.prompt_len} prompt + "
        f"{len(g.new_ids)} generated tokens ({g.stop})"
    ]


def _share_table(g: Generation, layers: list[int], names: list[str]) -> list[str]:
    r = g.routing
    assert r is not None
    all_s, gen_s = r.share(), r.share(slice(g.prompt_len, None))
    rows = [["layer", *names]]
    for li in layers:
        i = r.layers.index(li)
        rows.append(
            [str(li)]
            + [
                f"{100 * a:.0f}% ({100 * b:.0f}%)"
                for a, b in zip(all_s[i].tolist(), gen_s[i].tolist())
            ]
        )
    w = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = [
        f"share of tokens by the expert with the largest weight: all {len(g.ids)} tokens "
        f"(generated {len(g.new_ids)} only, in brackets)"
    ]
    for row in rows:
        lines.append(
            "  ".join([row[0].ljust(w[0])] + [c.rjust(w[j + 1]) for j, c in enumerate(row[1:])])
        )
    return lines


def _layers(g: Generation, layer: int | None) -> list[int]:
    r = g.routing
    if r is None:
        raise ValueError("this generation has no routing record (a dense model)")
    if layer is None:
        return list(r.layers)
    if layer not in r.layers:
        raise ValueError(f"layer {layer} has no routing record (MoE layers: {r.layers})")
    return [layer]


def render_plain(
    g: Generation, layer: int | None = None, width: int = 100, source: str | None = None
) -> str:
    """Text rows, each followed by one letter row per layer."""
    layers = _layers(g, layer)
    r = g.routing
    assert r is not None
    let = letters(r.experts)
    top = r.top.tolist()  # (L, T)
    legend = ", ".join(f"{c} = {e}" for c, e in zip(let, r.experts))
    lines = _header(g, source) + [
        f"experts: {legend} (the letter of the expert with the largest weight, under each "
        f"character); {BOUNDARY} generation starts; ⏎ newline, ␂ BOS, ␃ EOS",
        "",
    ]
    pre = max(len(f"layer {li}") for li in layers) + 1
    for row in _wrap(_cells(g, marker=True), max(20, width - pre)):
        lines.append("text".ljust(pre) + "".join(t for t, _ in row))
        for li in layers:
            i = r.layers.index(li)
            marks = []
            for t, u in row:
                w = cell_width(t)
                marks.append(" " * w if u is None else let[top[i][u.last]] * w)
            lines.append(f"layer {li}".ljust(pre) + "".join(marks))
        lines.append("")
    return "\n".join(lines + _share_table(g, layers, r.experts))


def _sgr(*codes: int | str) -> str:
    return "\x1b[" + ";".join(str(c) for c in codes) + "m"


RESET = "\x1b[0m"


def render_terminal(
    g: Generation,
    layer: int | None = None,
    color: bool = True,
    cols: int | None = None,
    source: str | None = None,
) -> str:
    """The text once per layer, each character on its expert's background colour."""
    if not color:
        return render_plain(
            g, layer, width=cols or shutil.get_terminal_size().columns, source=source
        )
    layers = _layers(g, layer)
    r = g.routing
    assert r is not None
    top = r.top.tolist()
    cols = cols or shutil.get_terminal_size().columns
    swatch = "  ".join(
        f"{_sgr(30, 48, 5, PALETTE[e % len(PALETTE)][0])} {name} {RESET}"
        for e, name in enumerate(r.experts)
    )
    lines = _header(g, source) + [
        f"experts: {swatch}  (colour = the expert with the largest weight; prompt underlined; "
        "⏎ newline, ␂ BOS, ␃ EOS)",
        "",
    ]
    pre = max(len(f"layer {li}") for li in layers) + 3
    for row in _wrap(_cells(g, marker=False), max(20, cols - pre)):
        for li in layers:
            i = r.layers.index(li)
            parts = []
            for t, u in row:
                assert u is not None
                e = top[i][u.last]
                codes: list[int | str] = [30, 48, 5, PALETTE[e % len(PALETTE)][0]]
                if u.prompt:
                    codes.append(4)
                parts.append(_sgr(*codes) + t + RESET)
            lines.append(f"layer {li}".ljust(pre - 2) + "│ " + "".join(parts))
        if len(layers) > 1:
            lines.append("")
    if len(layers) == 1:
        lines.append("")
    return "\n".join(lines + _share_table(g, layers, r.experts))


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #111; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
.meta { color: #444; }
.text { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  white-space: pre-wrap; word-break: break-all; line-height: 1.8; border: 1px solid #ccc;
  padding: .6em; border-radius: 4px; }
.text span { border-radius: 2px; }
.text span:hover { outline: 2px solid #000; }
.p { text-decoration: underline; text-decoration-color: #555; }
.sp { font-size: 80%; color: #333; }
.legend span { padding: .1em .5em; margin-right: .6em; border-radius: 3px; }
table { border-collapse: collapse; } td, th { padding: .2em .8em; text-align: right; }
th { border-bottom: 1px solid #999; }
"""


def _hover(g: Generation, u: Unit) -> str:
    r = g.routing
    assert r is not None
    lines = []
    for t in u.tokens:
        sp = g.specials[t]
        piece = sp.upper() if sp else repr(g.pieces[t]) if g.pieces[t] else "(byte)"
        lines.append(f"token {t} {piece} (id {g.ids[t]})" + (" prompt" if t < g.prompt_len else ""))
        for i, li in enumerate(r.layers):
            ids, ws = r.expert_ids[i, t].tolist(), r.weights[i, t].tolist()
            picks = ", ".join(f"{r.experts[e]} {w:.3f}" for e, w in zip(ids, ws))
            lines.append(f"  layer {li}: {picks}")
    return "\n".join(lines)


def render_html(
    g: Generation,
    source: str | None = None,
    layer: int | None = None,
    title: str = "moe generate: routing",
) -> str:
    """A self-contained HTML page (no scripts, no external resources)."""
    layers = _layers(g, layer)
    r = g.routing
    assert r is not None
    esc = _html.escape
    css = _CSS + "".join(
        f".e{e} {{ background: {PALETTE[e % len(PALETTE)][1]}; }}\n" for e in range(len(r.experts))
    )
    us = units(g)
    hovers = [esc(_hover(g, u), quote=True).replace("\n", "&#10;") for u in us]
    top = r.top.tolist()
    body = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">{esc(" ".join(_header(g, source)))}. Colour: the expert with the '
        "largest routing weight; prompt underlined; hover a character for every layer's "
        "top-k experts and weights.</p>",
        '<p class="legend">'
        + "".join(f'<span class="e{e}">{esc(n)}</span>' for e, n in enumerate(r.experts))
        + "</p>",
    ]
    for li in layers:
        i = r.layers.index(li)
        spans = []
        for u, hv in zip(us, hovers):
            cls = f"e{top[i][u.last]}" + (" p" if u.prompt else "")
            special = any(g.specials[t] for t in u.tokens)
            if special:
                cls += " sp"
            spans.append(f'<span class="{cls}" title="{hv}">{esc(u.text)}</span>')
        body += [f"<h2>Layer {li}</h2>", f'<div class="text">{"".join(spans)}</div>']
    table = [
        "<table>",
        "<tr><th>layer</th>"
        + "".join(f'<th><span class="e{e}">{esc(n)}</span></th>' for e, n in enumerate(r.experts))
        + "</tr>",
    ]
    all_s, gen_s = r.share(), r.share(slice(g.prompt_len, None))
    for li in layers:
        i = r.layers.index(li)
        table.append(
            f"<tr><td>{li}</td>"
            + "".join(
                f"<td>{100 * a:.0f}% ({100 * b:.0f}%)</td>"
                for a, b in zip(all_s[i].tolist(), gen_s[i].tolist())
            )
            + "</tr>"
        )
    table.append("</table>")
    body += [
        "<h2>Share of tokens by the expert with the largest weight</h2>",
        f"<p>All {len(g.ids)} tokens (the {len(g.new_ids)} generated ones in brackets).</p>",
        *table,
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n<style>{css}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
