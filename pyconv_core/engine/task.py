"""What a task gives the Trainer: a training step and an evaluation (:class:`Task`), and the precision both
run in (:func:`autocast`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

__all__ = ["Task", "autocast"]


class Task(Protocol):
    """Protocol of the classification, detection, video and segmentation tasks.

    Attributes:
        name: the task's name, recorded in ``config.json``.
        main_metric: key of :meth:`evaluate`'s result that picks ``best.pt`` (higher is better).
        collate_fn: batch collation for the DataLoader, or None for PyTorch's default.
    """

    @property
    def name(self) -> str: ...

    @property
    def main_metric(self) -> str: ...

    @property
    def collate_fn(self) -> Callable[[list], Any] | None: ...

    def train_step(self, model: nn.Module, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        """Move ``batch`` to ``device``, run the model, return losses; ``"loss"`` is optimized, the
        other entries are logged. Runs inside the Trainer's autocast."""
        ...

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        """Metrics over ``loader`` (the model is in eval mode, gradients off). Under DDP each process
        sees a shard: sum raw counts with ``engine.distributed.all_reduce_sum`` before dividing."""
        ...


def autocast(device: torch.device, amp: str | None) -> torch.autocast:
    """The autocast context of ``amp``: None (full precision), "bf16", or "fp16" (the Trainer adds a grad
    scaler)."""
    if amp not in (None, "bf16", "fp16"):
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp) if amp else None
    return torch.autocast(device.type, dtype=dtype, enabled=amp is not None)
