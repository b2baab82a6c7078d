"""Learning rates: schedules as step-wise multipliers for ``LambdaLR`` (warmup, multistep, cosine, poly), linear
scaling with the batch, and per-parameter-group factors."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

__all__ = ["SCHEDULES", "lr_multiplier", "scaled_lr", "param_groups"]

SCHEDULES = ("multistep", "cosine", "poly", "constant")


def scaled_lr(lr: float, batch_size: int, reference_batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): ``lr`` is given for ``reference_batch`` images."""
    return lr * batch_size / reference_batch


def lr_multiplier(
    schedule: str,
    epochs: int,
    steps_per_epoch: int,
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
    power: float = 0.9,
) -> Callable[[int], float]:
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


def param_groups(model: nn.Module, base_lr: float, lr_multipliers: dict[str, float]) -> list[dict[str, Any]]:
    """Optimizer groups: parameters whose name starts with a prefix of ``lr_multipliers`` train at
    ``base_lr`` times its factor (e.g. a segmentation head at 10x, as the authors' semseg code), the
    rest at ``base_lr`` (first group: the lr logged per epoch). Schedules scale every group alike."""
    negative = {prefix: factor for prefix, factor in lr_multipliers.items() if factor < 0}
    if negative:
        raise ValueError(f"lr_multipliers {negative} are negative: use factors >= 0 (0 freezes those parameters)")
    factors: dict[float, list[nn.Parameter]] = {1.0: []}
    matched = set()
    for name, param in model.named_parameters():
        prefix = next((p for p in lr_multipliers if name.startswith(p)), None)
        matched.add(prefix)
        factors.setdefault(float(lr_multipliers[prefix]) if prefix else 1.0, []).append(param)
    unmatched = sorted(set(lr_multipliers) - matched)
    if unmatched:
        tops = sorted({name.split(".")[0] + "." for name, _ in model.named_parameters()})
        raise ValueError(
            f"lr_multipliers prefixes {unmatched} match no parameter of {type(model).__name__}; "
            f"its parameter names start with {tops}"
        )
    return [{"params": params, "lr": base_lr * factor} for factor, params in factors.items() if params]
