"""What a task gives the Trainer: a training step and an evaluation, nothing else.

The Trainer owns the loop (devices, AMP, DDP, schedules, checkpoints, logging); a task only
says how one batch becomes a loss dict and how a loader becomes metrics.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass
class RunParams:
    """The parameters every task's ``Params`` shares: how a run executes, not what it learns.
    A task's ``Params`` subclasses this (redeclaring a field changes its default) and adds its own."""

    amp: str = "none"  # none | bf16 | fp16
    channels_last: bool = False  # NHWC / NDHWC memory format
    compile: bool = False  # torch.compile the model
    pyconv_plan: str = "auto"  # PyConv plan: auto (fastest, measured once per layer shape) | naive | e.g. 0|123
    sync_bn: bool = False  # SyncBatchNorm under torchrun
    gpus: int = 1  # processes; >1 starts torchrun
    seed: int = 0
    run_name: str = ""  # runs/<run_name>/; default: the model, recipe or data, and seed
    runs_dir: str = "runs"
    num_workers: int = 0  # DataLoader worker processes
    progress: bool = True  # progress bars (off under papermill / CI)
    log_every: int = 10  # optimizer steps per training-loss row of metrics.jsonl (the loss curve)
    resume: bool = False  # continue runs/<run_name>/last.pt

    def run_args(self) -> dict[str, Any]:
        """The ``TrainConfig`` fields these parameters set as given (the task adds its recipe), with
        every parameter recorded as ``extra``."""
        return dict(amp=None if self.amp in ("none", "", None) else self.amp, channels_last=self.channels_last,
                    compile=self.compile, pyconv_plan=self.pyconv_plan, sync_bn=self.sync_bn, seed=self.seed,
                    resume=self.resume, num_workers=self.num_workers, runs_dir=self.runs_dir, progress=self.progress,
                    log_every=self.log_every,
                    extra=dataclasses.asdict(self))
