"""Learning-rate schedule shapes."""

from __future__ import annotations

import math

import pytest

from tailor.train.schedule import learning_rate, warmup_steps_for


def _curve(schedule: str, total: int = 100, warmup: int = 10, min_ratio: float = 0.0) -> list[float]:
    return [learning_rate(s, total, 1.0, warmup, schedule, min_ratio) for s in range(total)]


def test_warmup_rises_linearly_and_never_starts_at_zero():
    lrs = _curve("cosine")
    assert lrs[0] == pytest.approx(1 / 11)  # step 0 is the first of 11 warmup points up to step 10
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:11], strict=True))
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(10 / 11)


def test_cosine_decays_to_floor_through_half_at_midpoint():
    lrs = _curve("cosine", min_ratio=0.1)
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert 0.1 < lrs[-1] < 0.11
    assert min(lrs) == pytest.approx(1 / 11)  # the first warmup step; the decay stops above the 0.1 floor


def test_linear_decays_in_equal_steps():
    lrs = _curve("linear")
    diffs = [a - b for a, b in zip(lrs[10:], lrs[11:], strict=False)]
    assert all(math.isclose(d, diffs[0]) for d in diffs)
    assert lrs[-1] == pytest.approx(1 / 90)


def test_constant_after_warmup():
    lrs = _curve("constant")
    assert set(lrs[10:]) == {1.0}


def test_warmup_from_ratio_and_never_whole_run():
    assert warmup_steps_for(200, 0, 0.05) == 10
    assert warmup_steps_for(200, 7, 0.05) == 7
    assert warmup_steps_for(5, 50, 0.0) == 4


def test_unknown_schedule_refused():
    with pytest.raises(ValueError, match="cosine, linear or constant"):
        learning_rate(50, 100, 1.0, 0, "exponential")
