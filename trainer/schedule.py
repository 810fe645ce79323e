"""Learning-rate schedules: linear warmup, then cosine decay (``cosine``) or warmup-stable-decay (``wsd``)
down to ``min_ratio`` of the peak.

A pure function of the optimizer step, so a resumed run continues the exact same sequence: the
trainer sets the rate of every parameter group before each optimizer step.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd")


def warmup_steps(total_steps: int, warmup_iters: int = 0, warmup_ratio: float = 0.0) -> int:
    """``--warmup_iters`` when > 0, else ``round(warmup_ratio * total_steps)``; never the whole run."""
    w = int(warmup_iters) if warmup_iters and warmup_iters > 0 else int(round(warmup_ratio * total_steps))
    return max(0, min(w, max(total_steps - 1, 0)))


def lr_at(step: int, total_steps: int, peak_lr: float, warmup: int = 0, min_ratio: float = 0.1,
          schedule: str = "cosine", decay_ratio: float = 0.3) -> float:
    """Rate for optimizer step ``step`` (0-based: the first update uses ``lr_at(0, ...)``).

    Warmup: ``peak * (step + 1) / warmup`` for ``step < warmup``. Then, ``cosine``: cosine from the peak
    down to ``min_ratio * peak``, reached at the last step (``total_steps - 1``); ``wsd`` (warmup-stable-decay):
    the peak until the last ``decay_ratio`` of the run, then linear down to ``min_ratio * peak`` at the last step.
    """
    if warmup > 0 and step < warmup:
        return peak_lr * (step + 1) / warmup
    lo = min_ratio * peak_lr
    last = max(total_steps - 1, 0)
    if schedule == "wsd":
        decay_start = max(warmup, last - int(round(decay_ratio * total_steps)))
        if step <= decay_start:
            return peak_lr
        progress = min(1.0, (step - decay_start) / max(1, last - decay_start))
        return peak_lr + (lo - peak_lr) * progress
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    decay = max(1, last - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / decay))
    return lo + 0.5 * (peak_lr - lo) * (1.0 + math.cos(math.pi * progress))
