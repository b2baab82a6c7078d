"""What a task gives the Trainer: a training step and an evaluation, nothing else.

The Trainer owns the loop (devices, AMP, DDP, schedules, checkpoints, logging); a task only
says how one batch becomes a loss dict and how a loader becomes metrics.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader


class Task(Protocol):
    """Protocol of the classification, detection, video and segmentation tasks.

    Attributes:
        name: the task's name, recorded in ``config.json``.
        main_metric: key of :meth:`evaluate`'s result that picks ``best.pt`` (higher is better).
        collate_fn: batch collation for the DataLoader, or None for PyTorch's default.
    """

    name: str
    main_metric: str
    collate_fn: Callable[[list], Any] | None

    def train_step(self, model: nn.Module, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        """Move ``batch`` to ``device``, run the model, return losses; ``"loss"`` is optimized, the
        other entries are logged. Runs inside the Trainer's autocast."""
        ...

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        """Metrics over ``loader`` (the model is in eval mode, gradients off). Under DDP each process
        sees a shard: sum raw counts with ``engine.distributed.all_reduce_sum`` before dividing."""
        ...
