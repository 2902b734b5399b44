"""Learning-rate multipliers (pure Python): `lr(step) = base_lr * lr_multiplier(step, total_steps, cfg)`.

`step` is the 0-based index of the optimizer step about to be taken; `total_steps` the number of optimizer
steps in the run, so the last step is `total_steps - 1`. Every kind starts with a linear warmup from 0 that
gives step 0 a non-zero LR: `(step + 1) / warmup_steps` for `step < warmup_steps` (peak at the last warmup
step). After the warmup (W = warmup_steps, N = total_steps, r = min_lr_ratio):

- `cosine`:   r + (1 - r) * (1 + cos(pi * p)) / 2 with p = (step - W) / max(1, N - 1 - W), clamped to [0, 1]:
              1 at the first post-warmup step, exactly r at the last step.
- `wsd`:      1 until the final D = round(decay_fraction * N) steps, then linear 1 -> r:
              1 - (1 - r) * (step - (N - D) + 1) / D, exactly r at the last step.
- `step`:     1, then step_factors[i] (a multiplier of the base LR, not cumulative) once
              step >= step_milestones[i] * N (paper: x0.316 at 80 %, x0.1 at 90 %).
- `constant`: 1.

Steps past the end keep the final value. The same multiplier drives every parameter group; the Engram
tables use `base_lr * engram_lr_multiplier * lr_multiplier(...)`.
"""

from __future__ import annotations

import math

from ..config import ScheduleConfig


def warmup_multiplier(step: int, warmup_steps: int) -> float:
    """Linear warmup (step + 1) / warmup_steps, 1 once the warmup is over (or without one)."""
    return 1.0 if step >= warmup_steps else (step + 1) / warmup_steps


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """The LR multiplier of 0-based optimizer step `step` in a run of `total_steps` steps."""
    if total_steps <= 0:
        raise ValueError(f"lr_multiplier: total_steps={total_steps} must be positive")
    if step < 0:
        raise ValueError(f"lr_multiplier: step={step} must be >= 0")
    if cfg.warmup_steps < 0:
        raise ValueError(f"schedule.warmup_steps={cfg.warmup_steps} must be >= 0")
    if step < cfg.warmup_steps:
        return warmup_multiplier(step, cfg.warmup_steps)
    r = cfg.min_lr_ratio
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "cosine":
        span = max(1, total_steps - 1 - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.kind == "wsd":
        if not 0 < cfg.decay_fraction <= 1:
            raise ValueError(f"schedule.decay_fraction={cfg.decay_fraction} must be in (0, 1]")
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return 1.0 - (1.0 - r) * progress
    if cfg.kind == "step":
        if len(cfg.step_milestones) != len(cfg.step_factors):
            raise ValueError(f"schedule.step_milestones {cfg.step_milestones} and step_factors "
                             f"{cfg.step_factors} must have the same length")
        if list(cfg.step_milestones) != sorted(cfg.step_milestones):
            raise ValueError(f"schedule.step_milestones {cfg.step_milestones} must be increasing")
        factor = 1.0
        for milestone, f in zip(cfg.step_milestones, cfg.step_factors, strict=True):
            if step >= milestone * total_steps:
                factor = f
        return factor
    raise ValueError(f"schedule.kind: unknown '{cfg.kind}' (expected cosine, wsd, step or constant)")
