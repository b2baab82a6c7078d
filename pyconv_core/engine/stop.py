"""How a run stops early: on a signal (it saves where it is, to resume), or when a loss or a weight is no
longer finite (the last good checkpoint is kept, never overwritten by the diverged model)."""

from __future__ import annotations

import math
import signal
from typing import Any

import torch
from torch import nn

from pyconv_core.engine import distributed as dist

__all__ = ["STOP_SIGNALS", "StopRequest", "NonFiniteLossError", "first_nonfinite_loss", "first_nonfinite"]

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and returns."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        try:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no handlers
            pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def requested(self, device: torch.device) -> int:
        """The signal that asks the run to stop (0: none). Under DDP any process's: every process must stop
        at the same step, since one that trains on waits forever for the others in its gradient all_reduce."""
        if not dist.is_distributed():
            return self.signal or 0
        return int(dist.all_reduce_max(torch.tensor([self.signal or 0], device=device))[0])

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def first_nonfinite_loss(losses: list[torch.Tensor]) -> tuple[int, float] | None:
    """Position and value of the first NaN or infinite loss in ``losses`` (None: all finite), with one sync.
    The steps after such a loss only change weights that the checkpoints refuse to save."""
    if not losses:
        return None
    values = torch.stack(losses).tolist()
    return next(((i, v) for i, v in enumerate(values) if not math.isfinite(v)), None)


def first_nonfinite(model: nn.Module) -> str | None:
    """The first parameter or buffer holding a NaN or inf (None: all finite), with one device sync."""
    state = {name: value for name, value in model.state_dict().items() if value.is_floating_point()}
    finite = torch.stack([torch.isfinite(value).all() for value in state.values()]).tolist()
    return next((name for name, ok in zip(state, finite) if not ok), None)
