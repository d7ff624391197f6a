"""LR schedule values at the steps that define each shape."""

from __future__ import annotations

import math

import pytest

from scaleforge.core.lr_schedule import lr_factor
from scaleforge.core.optimizer import OptimConfig


def _optim(schedule: str, **kwargs) -> OptimConfig:
    return OptimConfig(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1, **kwargs)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_warmup_rises_linearly_to_the_peak(schedule):
    optim = _optim(schedule)
    assert [lr_factor(s, optim, 110) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


def test_cosine_is_half_way_at_mid_decay_and_ends_at_the_floor():
    optim = _optim("cosine")
    assert lr_factor(59, optim, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(34, optim, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(109, optim, 110) == pytest.approx(0.1)


def test_linear_decays_evenly_to_the_floor():
    optim = _optim("linear")
    assert lr_factor(59, optim, 110) == pytest.approx(0.55)
    assert lr_factor(109, optim, 110) == pytest.approx(0.1)


def test_wsd_holds_the_peak_then_decays_over_the_last_fraction():
    optim = _optim("wsd", decay_fraction=0.2)
    assert lr_factor(10, optim, 110) == 1.0
    assert lr_factor(89, optim, 110) == 1.0  # 80 of 100 post-warmup steps are stable
    assert lr_factor(99, optim, 110) == pytest.approx(1 - 0.9 * 0.5)
    assert lr_factor(109, optim, 110) == pytest.approx(0.1)


def test_constant_stays_at_the_peak_after_warmup():
    assert lr_factor(109, _optim("constant"), 110) == 1.0


def test_no_warmup_starts_at_the_peak():
    optim = OptimConfig(schedule="cosine", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_factor(0, optim, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 100)))
    assert lr_factor(99, optim, 100) == pytest.approx(0.0)
