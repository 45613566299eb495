"""The study report: `report.md` plus PNG plots, from one `results.json` or several seeds of it.

Input is the results dict the study runner (moe/experiments/study/runner.py) writes; every
optional part of it (`arms`, `curves`, `merge`, routing, per-domain evals) may be missing,
and the matching section then says so instead of failing. Numbers are formatted by the
`format_*` helpers so the tests can parse the tables back.

Modules, by responsibility:
- `format`: numbers and markdown tables (`format_num`, `format_delta`, `format_table`, ...);
- `results`: reading a results dict (arms, the reference, branches, gains, forgetting);
- `sections`: the single-run report's markdown sections, `render_report`, `write_report`;
- `plots`: the PNG plots;
- `aggregate`: several seeds of one study, `aggregate` and its report.

Conventions: bits per byte with 3 decimals; differences are "this arm minus the reference", so a
negative Δbpb is better; negative signs are the typographic minus (U+2212).
"""

from moe.experiments.study.report.aggregate import (
    aggregate,
    render_aggregate_report,
    write_aggregate_report,
)
from moe.experiments.study.report.format import (
    MINUS,
    bold,
    format_count,
    format_delta,
    format_flops,
    format_mean_ci,
    format_mean_std,
    format_num,
    format_pct,
    format_seconds,
    format_table,
)
from moe.experiments.study.report.plots import (
    BPB_PLOT,
    CURVES_PLOT,
    PLOTS_DIR,
    SPECIALIZATION_PLOT,
    plot_aggregate,
    plot_bpb,
    plot_curves,
    plot_specialization,
)
from moe.experiments.study.report.results import (
    arm_table,
    branches,
    experts_arm,
    forgetting,
    gains,
    reference,
    specialization_matrix,
)
from moe.experiments.study.report.sections import render_report, write_report

__all__ = [
    "BPB_PLOT", "CURVES_PLOT", "MINUS", "PLOTS_DIR", "SPECIALIZATION_PLOT",
    "aggregate", "arm_table", "bold", "branches", "experts_arm", "forgetting",
    "format_count", "format_delta", "format_flops", "format_mean_ci", "format_mean_std",
    "format_num", "format_pct", "format_seconds", "format_table", "gains", "plot_aggregate",
    "plot_bpb", "plot_curves", "plot_specialization", "reference", "render_aggregate_report",
    "render_report", "specialization_matrix", "write_aggregate_report", "write_report",
]
