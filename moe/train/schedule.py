"""AdamW and the learning-rate schedule, made once for `moe train` (LitLM.configure_optimizers)
and the plain step loop (moe.train.loop.make_optimizer).

Schedules (OptimConfig.schedule): linear warm-up to lr over warmup_steps, then
- cosine: down to lr * min_lr_ratio at the schedule's last step;
- wsd (warm-up, stable, decay): lr until the last decay_fraction of the steps, then linearly
  down to lr * min_lr_ratio;
- constant: lr.
"""

from __future__ import annotations

import math

import torch

from moe.config import OptimConfig


def param_groups_by_name(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """The names of AdamW's two groups, (decay, no_decay), each in `named_parameters` order:
    norms and other 1-D parameters, and the token embedding, are not decayed. The one place of
    the rule: adamw_with_schedule builds its groups from it, and moe.surgery.optim_state reads a
    Lightning checkpoint's optimizer indices back to names with it (indices run through decay,
    then no_decay)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "tok_emb" in name else decay).append(name)
    return decay, no_decay


def adamw_with_schedule(
    model: torch.nn.Module, o: OptimConfig, total: int, start: int = 0
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over every parameter, norms (1-D) and embeddings undecayed, and its LambdaLR
    (`lr_lambda(o, total, start)`, stepped once per step). Frozen parameters stay in the groups
    (they get no gradient, so AdamW skips them): the optimizer state then has the same layout
    whatever is trained, and a run that freezes part of the model can fork from one that trained
    all of it."""
    params = dict(model.named_parameters())
    decay, no_decay = ([params[n] for n in names] for names in param_groups_by_name(model))
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o, total, start))


def wsd_decay_start(o: OptimConfig, total: int, start: int = 0) -> int:
    """First step of a wsd cool-down: the last decay_fraction of the schedule's `total` steps.

    Steps count from the start of the lineage, so a run continued from a fork point cools down
    exactly as if it had never been forked. A run forked at `start` late enough that its share
    would begin earlier cools down over all of its own steps.
    """
    return max(start, total - max(1, round(o.decay_fraction * total)))


def lr_lambda(o: OptimConfig, total: int, start: int = 0):
    """LR multiplier at each step: linear warm-up to lr, then the schedule (see OptimConfig).

    cosine decays to lr * min_lr_ratio at `total`; wsd stays at lr until its cool-down, then
    falls linearly to lr * min_lr_ratio at its last step (total - 1); constant stays at lr.
    `start` is where a forked run began (see wsd_decay_start).
    """
    decay_start = wsd_decay_start(o, total, start)

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / max(1, o.warmup_steps)
        if o.schedule == "constant":
            return 1.0
        if o.schedule == "wsd":
            if step < decay_start:
                return 1.0
            progress = min(1.0, (step - decay_start + 1) / (total - decay_start))
            return 1.0 - (1.0 - o.min_lr_ratio) * progress
        span = max(1, total - o.warmup_steps)
        progress = min(1.0, (step - o.warmup_steps) / span)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
