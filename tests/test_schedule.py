"""LR schedules: values at key steps against the formulas, written out here."""

from __future__ import annotations

import math

import pytest

from engram_pretrain.config import ScheduleConfig
from engram_pretrain.train.schedule import lr_multiplier

N = 100  # total steps
W = 10  # warmup steps


def sched(kind: str, **kw: object) -> ScheduleConfig:
    return ScheduleConfig(kind=kind, warmup_steps=W, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["cosine", "wsd", "step", "constant"])
def test_linear_warmup_from_zero_with_nonzero_first_step(kind: str) -> None:
    cfg = sched(kind)
    assert lr_multiplier(0, N, cfg) == pytest.approx(1 / W)
    assert lr_multiplier(4, N, cfg) == pytest.approx(5 / W)
    assert lr_multiplier(W - 1, N, cfg) == pytest.approx(1.0)
    assert lr_multiplier(W, N, cfg) == pytest.approx(1.0)
    ramp = [lr_multiplier(s, N, cfg) for s in range(W)]
    assert all(b > a for a, b in zip(ramp, ramp[1:], strict=False))


def test_cosine_reaches_min_ratio_at_the_last_step() -> None:
    r = 0.1
    cfg = sched("cosine", min_lr_ratio=r)
    span = N - 1 - W
    for s in (W, W + 1, 30, 55, 80, N - 2, N - 1):
        expected = r + (1 - r) * 0.5 * (1 + math.cos(math.pi * (s - W) / span))
        assert lr_multiplier(s, N, cfg) == pytest.approx(expected, abs=1e-12), s
    assert lr_multiplier(N - 1, N, cfg) == pytest.approx(r)
    assert lr_multiplier(W + span // 2, N, cfg) == pytest.approx((1 + r) / 2, abs=0.02)
    assert lr_multiplier(N + 5, N, cfg) == pytest.approx(r)  # past the end: stays at the floor
    values = [lr_multiplier(s, N, cfg) for s in range(W, N)]
    assert all(b <= a for a, b in zip(values, values[1:], strict=False))


def test_wsd_is_flat_then_decays_linearly_over_the_last_fraction() -> None:
    r, frac = 0.1, 0.2
    cfg = sched("wsd", min_lr_ratio=r, decay_fraction=frac)
    decay = 20  # 0.2 * 100
    start = N - decay  # first decaying step
    assert all(lr_multiplier(s, N, cfg) == 1.0 for s in range(W, start))
    for s in range(start, N):
        assert lr_multiplier(s, N, cfg) == pytest.approx(1 - (1 - r) * (s - start + 1) / decay), s
    assert lr_multiplier(N - 1, N, cfg) == pytest.approx(r)
    assert lr_multiplier(start, N, cfg) < 1.0


def test_step_decay_uses_factors_of_the_base_lr() -> None:
    cfg = sched("step", step_milestones=[0.8, 0.9], step_factors=[0.316, 0.1])
    assert lr_multiplier(79, N, cfg) == 1.0
    assert lr_multiplier(80, N, cfg) == pytest.approx(0.316)
    assert lr_multiplier(89, N, cfg) == pytest.approx(0.316)
    assert lr_multiplier(90, N, cfg) == pytest.approx(0.1)  # 0.1 of the base, not 0.316 * 0.1
    assert lr_multiplier(N - 1, N, cfg) == pytest.approx(0.1)
    # a milestone between steps: 0.8 * 37 = 29.6 -> first reduced step is 30
    assert lr_multiplier(29, 37, cfg) == 1.0 and lr_multiplier(30, 37, cfg) == pytest.approx(0.316)


def test_constant_and_no_warmup() -> None:
    assert all(lr_multiplier(s, N, sched("constant")) == 1.0 for s in range(W, N))
    cfg = ScheduleConfig(kind="cosine", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_multiplier(0, N, cfg) == pytest.approx(1.0)
    assert lr_multiplier(N - 1, N, cfg) == pytest.approx(0.0, abs=1e-12)


def test_user_errors() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        lr_multiplier(0, 0, sched("cosine"))
    with pytest.raises(ValueError, match="step"):
        lr_multiplier(-1, N, sched("cosine"))
    with pytest.raises(ValueError, match="kind"):
        lr_multiplier(W, N, sched("linear"))
    with pytest.raises(ValueError, match="same length"):
        lr_multiplier(W, N, sched("step", step_milestones=[0.5], step_factors=[0.3, 0.1]))
