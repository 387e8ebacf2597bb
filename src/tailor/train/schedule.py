"""Learning-rate schedule: linear warmup, then cosine, linear or constant decay.

A plain function of the step (no scheduler object), so resuming a run needs only the step number.
"""

from __future__ import annotations

import math


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """warmup_steps when given, else warmup_ratio of the run, never the whole run."""
    steps = warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)
    return min(steps, max(total_steps - 1, 0))


def learning_rate(step: int, total_steps: int, peak_lr: float, warmup_steps: int = 0,
                  schedule: str = "cosine", min_lr_ratio: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    warmup:   lr = peak * (step + 1) / (warmup + 1) for step < warmup  (never exactly 0: no wasted step)
    cosine:   lr = peak * (m + (1 - m) * (1 + cos(pi * p)) / 2)
    linear:   lr = peak * (m + (1 - m) * (1 - p))
    constant: lr = peak
    with p = (step - warmup) / (total - warmup) in [0, 1) and m = min_lr_ratio; p reaches 1 only after
    the last step, so no step is spent at learning rate 0.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return peak_lr
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / decay_steps, 0.0), 1.0)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use cosine, linear or constant")
    return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * shape)
