"""The fine-tune delta experiments (`fleet:`, issue 16); see ./study.py."""

from moe.experiments import Experiment, register

register(Experiment(
    "fleet", lambda r: r.fleet.kind is not None, f"{__name__}.study",
    "fine-tune deltas: size vs bpb per compression, a simulated fleet (issue 16)",
    extends=("fleet.arms",),
))  # fmt: skip
