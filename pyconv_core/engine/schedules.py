"""Learning-rate schedules as step-wise multipliers for ``LambdaLR``: warmup, multistep, cosine, poly."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

__all__ = ["SCHEDULES", "lr_multiplier", "scaled_lr"]

SCHEDULES = ("multistep", "cosine", "poly", "constant")


def scaled_lr(lr: float, batch_size: int, reference_batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): ``lr`` is given for ``reference_batch`` images."""
    return lr * batch_size / reference_batch


def lr_multiplier(schedule: str, epochs: int, steps_per_epoch: int, milestones: Sequence[float] = (),
                  gamma: float = 0.1, warmup_epochs: float = 0.0, power: float = 0.9) -> Callable[[int], float]:
    """Multiplier of the base lr after ``step`` optimizer steps.

    ``milestones`` are in epochs (lr x ``gamma`` at each); warmup rises linearly from
    1/warmup_steps to 1 over ``warmup_epochs``; cosine and poly decay over all steps.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    total = max(1, epochs * steps_per_epoch)
    warmup = int(round(warmup_epochs * steps_per_epoch))
    boundaries = sorted(int(round(m * steps_per_epoch)) for m in milestones)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "multistep":
            return gamma ** sum(step >= b for b in boundaries)
        progress = min(1.0, step / total)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "poly":
            return (1.0 - progress) ** power
        return 1.0

    return multiplier
