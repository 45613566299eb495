"""The model-surgery measurements (`surgery:`, issue 13); see ./study.py."""

from moe.experiments import Experiment, register

register(Experiment(
    "surgery", lambda r: r.surgery.kind is not None, f"{__name__}.study",
    "grow, depth probe, shrink, retokenize: measured (issue 13)",
))  # fmt: skip
