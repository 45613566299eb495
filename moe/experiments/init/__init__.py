"""The init-from-distribution experiment (`init_study:`, issue 15); see ./study.py."""

from moe.experiments import Experiment, register

register(Experiment(
    "init_study", lambda r: bool(r.init_study.arms), f"{__name__}.study",
    "initialise from a trained model's weight distribution (issue 15)",
    extends=("init_study.arms",),
))  # fmt: skip
