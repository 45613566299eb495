"""The pruning measurements (`prune:`, issue 14); see ./study.py."""

from moe.experiments import Experiment, register

register(Experiment(
    "prune", lambda r: r.prune.kind is not None, f"{__name__}.study",
    "pruning per domain (curves, 3x3 matrix, overlap); train large then compress (issue 14)",
))  # fmt: skip
