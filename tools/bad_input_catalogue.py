"""Print the bad-input catalogue of docs/reliability.md by running every case.

    python tools/bad_input_catalogue.py > /tmp/catalogue.md

The cases are tests/bad_input_cases.py (the table tests/test_bad_input.py checks), so the doc
shows the messages exactly as `moe` prints them; fixture paths are shortened to `FX/`, the
repository to `./`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> int:
    import contextlib
    import io

    import torch
    from bad_input_cases import CASES, build_fixtures, last_line, run_case

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp).resolve()
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            fx = build_fixtures(root)
        rows: dict[str, list[str]] = {}
        bad = 0
        for i, case in enumerate(CASES, 1):
            rc, err = run_case(case, fx)
            argv = [str(a) for a in case.argv(fx)]
            cmd = "moe " + " ".join(argv)
            msg = "accepted: trains" if case.accepted and rc == 0 else last_line(err)
            ok = (rc == 0) if case.accepted else (
                rc != 0 and msg.startswith("moe: error:") and case.expect in msg
                and "Traceback" not in err)
            bad += not ok

            def short(s: str) -> str:
                s = s.replace(str(root) + "/", "FX/").replace(str(REPO) + "/", "./")
                return s.replace("|", "\\|")

            def code(s: str) -> str:
                return f"`` {s} ``" if "`" in s else f"`{s}`"

            rows.setdefault(command_of(argv), []).append(
                f"| {i} | {short(case.input)} | {code(short(cmd))} | {code(short(msg))} | {rc} |"
                + ("" if ok else " **UNEXPECTED** |"))
    print("| command | cases |")
    print("|---|---:|")
    for name, rs in rows.items():
        print(f"| [`moe {name}`](#moe-{name.replace(' ', '-')}) | {len(rs)} |")
    print(f"| all | {sum(map(len, rows.values()))} |")
    for name, rs in rows.items():
        print(f"\n### moe {name}\n")
        print("| # | input | command | message | exit code |")
        print("|---|---|---|---|---|")
        print("\n".join(rs))
    return 1 if bad else 0


def command_of(argv: list[str]) -> str:
    """The command a case runs: `train`, `delta apply`, ... (the options' order is the cases')."""
    if argv and argv[0] == "delta" and len(argv) > 1 and not argv[1].startswith("-"):
        return f"delta {argv[1]}"
    return argv[0] if argv else "(none)"


if __name__ == "__main__":
    sys.exit(main())
