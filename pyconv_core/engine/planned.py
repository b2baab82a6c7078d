"""Layers with several equivalent execution plans (PyConv's: layers/plans.py), as the Trainer sees them: a
protocol, so that the engine never imports a layer."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from pyconv_core.engine.checkpoint import rng_state, set_rng_state
from pyconv_core.engine.task import Task, autocast

__all__ = ["PlannedLayer", "planned_layers", "recorded_plans", "tune_plans_eagerly"]


@runtime_checkable
class PlannedLayer(Protocol):
    """A layer that computes its forward by one of several equivalent execution plans (PyConv: layers/plans.py).
    The Trainer sets the run's plan mode on each, lets ``"auto"`` time its plans eagerly before torch.compile
    and records ``choices`` (input signature -> plan) in config.json; the plans travel in the layer's own
    state (its extra state), so checkpoints and resumes carry them without the Trainer."""

    choices: dict[str, str]

    def set_plan(self, plan: str) -> None: ...

    def awaits_tuning(self) -> bool: ...


def planned_layers(model: nn.Module) -> dict[str, PlannedLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PlannedLayer)}


def recorded_plans(model: nn.Module) -> dict[str, dict[str, str]]:
    """The plans chosen so far, per layer (module name) and input signature, for config.json."""
    return {name: dict(m.choices) for name, m in planned_layers(model).items() if m.choices}


def tune_plans_eagerly(model: nn.Module, task: Task, batch: Any, device: torch.device, amp: str | None) -> None:
    """Measure ``"auto"`` training plans (:class:`PlannedLayer`) with one eager forward of ``batch`` (torch.compile
    traces the layers without timing them, so a compiled run would otherwise keep the naive plan).
    The loss is dropped and the pass's side effects (BN running statistics, RNG) are undone."""
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    rng = rng_state()
    model.train()
    with autocast(device, amp):
        task.train_step(model, batch, device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    set_rng_state(rng)
