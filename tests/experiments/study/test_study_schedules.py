"""LR schedules: the shapes `optim.schedule` promises, step by step."""

import math

import pytest

from moe.config import OptimConfig
from moe.train.schedule import lr_lambda, wsd_decay_start


def curve(o, total, start=0):
    f = lr_lambda(o, total, start)
    return [f(s) for s in range(total)]


def test_wsd_warms_up_holds_then_cools_down_linearly():
    o = OptimConfig(schedule="wsd", warmup_steps=4, decay_fraction=0.25, min_lr_ratio=0.1)
    c = curve(o, 20)
    assert c[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert c[4:15] == [1.0] * 11  # stable until the last quarter (5 steps) of 20
    assert wsd_decay_start(o, 20) == 15
    # linear to min_lr_ratio at the last step: 1 - 0.9 * k/5 for k = 1..5
    assert c[15:] == pytest.approx([1 - 0.9 * k / 5 for k in range(1, 6)])
    assert c[-1] == pytest.approx(0.1)


def test_constant_is_flat_after_warmup():
    o = OptimConfig(schedule="constant", warmup_steps=2)
    assert curve(o, 10) == pytest.approx([0.5, 1.0] + [1.0] * 8)


def test_cosine_is_unchanged():
    o = OptimConfig(schedule="cosine", warmup_steps=0, min_lr_ratio=0.0)
    c = curve(o, 10)
    assert c[0] == pytest.approx(1.0)
    assert c[5] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_wsd_cooldown_counts_from_the_lineage_start_and_never_precedes_a_fork():
    o = OptimConfig(schedule="wsd", warmup_steps=0, decay_fraction=0.2)
    # continuing from step 30 of 100: the same cool-down as the run that never forked
    assert curve(o, 100, start=30) == curve(o, 100)
    # a fork at step 95 of a schedule whose cool-down began at 80 cools down over its own steps
    assert wsd_decay_start(o, 100, start=95) == 95
    c = curve(o, 100, start=95)
    assert c[94] == 1.0 and c[99] == pytest.approx(o.min_lr_ratio)
