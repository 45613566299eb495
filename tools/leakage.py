"""Leakage between each domain's training and held-out documents (issue #26), as a recipe builds
them: the share of held-out bytes that lie in a byte shingle (window of `--shingle` bytes) also
found in training, and the share of held-out documents (units: a genome region, else one piece)
covered above `--threshold` (moe.data.dedup.leakage).

    python tools/leakage.py recipes/study.yaml                # the recipe's data section as it is
    python tools/leakage.py recipes/study.yaml --compare      # data.dedup off and on, side by side
    python tools/leakage.py recipes/study.yaml data.bytes_per_domain=400000 --json

Training is what the model trains on (the budgeted training side), not the whole source. With
data.dedup on, `dropped` is what the rule removed from the whole held-out side of the split before
the budget (documents, bytes); the held-out set then refills its share of the budget from the
documents left.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe.config import DataConfig, load_recipe  # noqa: E402
from moe.data.corpus import build_corpus, source_for  # noqa: E402
from moe.data.dedup import dedup_rule, leakage  # noqa: E402


def domain_leakage(cfg: DataConfig, domain: str, shingle: int = 50,
                   threshold: float = 0.5) -> dict:  # fmt: skip
    """One row: the domain's corpus under `cfg` and its leakage."""
    t0 = time.perf_counter()
    c = build_corpus(domain, source_for(cfg, domain), cfg.bytes_per_domain, cfg.heldout_fraction,
                     dedup_rule(cfg))  # fmt: skip
    row = {"domain": domain, "dedup": cfg.dedup, **leakage(c.train, c.heldout, shingle, threshold),
           "train_bytes": sum(len(d.data) for d in c.train),
           "dropped_documents": c.dedup_documents, "dropped_bytes": c.dedup_bytes}
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    ap.add_argument("--shingle", type=int, default=50, help="bytes per shingle (default 50)")
    ap.add_argument("--threshold", type=float, default=0.5,
                    help="a held-out document is a duplicate above this covered share")
    ap.add_argument("--compare", action="store_true", help="data.dedup off and on")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    cfg = load_recipe(args.recipe, args.overrides).data
    configs = [replace(cfg, dedup=False), replace(cfg, dedup=True)] if args.compare else [cfg]
    rows = [domain_leakage(c, d, args.shingle, args.threshold)
            for d in cfg.domains for c in configs]  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{args.recipe}: bytes_per_domain={cfg.bytes_per_domain:,}, heldout_fraction="
          f"{cfg.heldout_fraction}, shingle={args.shingle} bytes, threshold={args.threshold}")
    print("| domain | dedup | held-out documents | held-out bytes | bytes covered by training "
          f"| documents > {args.threshold:.0%} covered | dropped by dedup (documents, bytes) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        dropped = (f"{r['dropped_documents']:,}, {r['dropped_bytes']:,}" if r["dedup"] else "-")
        print(f"| {r['domain']} | {'on' if r['dedup'] else 'off'} | {r['heldout_units']:,} "
              f"| {r['heldout_bytes']:,} | {r['covered_share']:.1%} "
              f"| {r['duplicate_units']} ({r['duplicate_share']:.1%}) | {dropped} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
