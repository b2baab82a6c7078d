"""The one training loop of all four tasks (classification, detection, video, segmentation).

A task supplies ``train_step`` and ``evaluate`` (``engine.task.Task``); ``fit`` does the rest:
device, AMP (bf16, or fp16 with a grad scaler), channels_last, the layers' execution plans (PyConv's,
measured once per layer shape, recorded in config.json; the checkpoints carry them in the layers' state,
see ``engine.planned``), torch.compile, DDP under
torchrun (sharded sampler, optional SyncBatchNorm, metrics reduced, rank 0 writes), linear lr
scaling, warmup + multistep/cosine/poly schedules, ``runs/<name>/`` records, atomic
checkpoints every epoch plus ``best.pt``, exact resume, and a clean stop on NaN or a signal. A run may
start from ``weights`` (the task loads them into the model it passes; the run records their path); with
``epochs`` 0 it only evaluates them.

A resume continues the experiment its folder records (``check_run_dir``): it may add epochs, change
``eval_every`` and how the run executes (``engine.logging.RESUMABLE_FIELDS``, ``EXECUTION_FIELDS``), and
``config.json`` lists each resume under ``"resumes"`` (time, epoch and step, what changed). More epochs
rebuild the schedule over the new total from the step reached: the epochs already run keep the lr they
had, while a cosine or poly decay that had reached its end rises again to its value at that fraction of
the longer run, and milestones that scale with epochs (the classification recipes') move; so the
extended run is not the one a start with the longer schedule would have trained.

``metrics.jsonl`` rows (also kept in the checkpoints' ``history``): ``"train"`` once per epoch (means
over the epoch's steps), ``"eval"`` per evaluation, and ``"step"`` for the training-loss curve: after
every ``log_every``-th step of an epoch and after its last step, the means over the steps since the
previous step row, at the fractional epoch reached (so ``ceil(steps_per_epoch / log_every)`` per epoch,
covering every step once). TensorBoard event files in the run folder hold the same rows as scalars
(``engine.logging.TensorBoardLog``).

Beside it: ``engine.config`` (TrainConfig, what a run folder may hold), ``engine.loader`` (each epoch's
seeded, sharded batches), ``engine.stop`` (signals, non-finite losses and weights), ``engine.meters`` (loss
sums and means), ``engine.schedules`` (learning rates).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from pyconv_core.engine import distributed as dist
from pyconv_core.engine.checkpoint import (
    CheckpointMismatchError,
    diff_state_dicts,
    load_checkpoint,
    remove_checkpoint,
    rng_state,
    save_atomic,
    set_rng_state,
)
from pyconv_core.engine.config import TrainConfig, check_run_dir, describe_changes
from pyconv_core.engine.files import hold_run_dir
from pyconv_core.engine.loader import EpochLoader, batch_len, dataset_len, epoch_loader
from pyconv_core.engine.logging import (
    TensorBoardLog,
    append_jsonl,
    changed_parameters,
    environment,
    read_config,
    workbook_path,
    write_json,
    write_jsonl,
)
from pyconv_core.engine.meters import DeviceSums, means, reduce_means, reduce_sum
from pyconv_core.engine.planned import planned_layers, recorded_plans, tune_plans_eagerly
from pyconv_core.engine.schedules import lr_multiplier, param_groups, scaled_lr
from pyconv_core.engine.stop import NonFiniteLossError, StopRequest, first_nonfinite, first_nonfinite_loss
from pyconv_core.engine.task import Task, autocast

__all__ = [
    "TrainConfig",
    "FitResult",
    "Task",
    "fit",
    "evaluate",
    "seed_everything",
    "check_run_dir",
    "NonFiniteLossError",
]


@dataclass
class FitResult:
    run_dir: Path
    history: list[dict]
    model: nn.Module
    best_metric: float | None
    stopped_by: int | None = None  # the signal that stopped the run early (last.pt holds where), None if it finished


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; call it before building a model so that its init is reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _channels_last_format(model: nn.Module) -> torch.memory_format:
    """torch's channels-last format for the rank of the model's convolution weights: NDHWC for a network
    with 5-D weights (video), NHWC otherwise; the engine need not know which kind of network it trains."""
    return torch.channels_last_3d if any(p.dim() == 5 for p in model.parameters()) else torch.channels_last


def _loader(
    dataset: Dataset,
    cfg: TrainConfig,
    collate_fn: Callable[[list], Any] | None,
    epoch: int,
    train: bool,
    skip_batches: int = 0,
) -> EpochLoader:
    """The run's loader of ``epoch`` (``engine.loader.epoch_loader`` with the run's batch size, seed and workers)."""
    return epoch_loader(dataset, cfg.batch_size, collate_fn, epoch, train, cfg.seed, cfg.num_workers, skip_batches)


def fit(model: nn.Module, task: Task, train_set: Dataset, val_set: Dataset | None, cfg: TrainConfig) -> FitResult:
    """Train ``model`` on ``train_set`` with ``task``'s step, evaluating on ``val_set``; see module doc.
    A folder that holds a run of the same parameters is trained again from scratch unless ``resume``.
    One process at a time trains in a folder: rank 0 holds its lock (``engine.files.hold_run_dir``)."""
    check_run_dir(cfg)  # before the process group starts: a folder in use is refused at once
    device = dist.init()
    with hold_run_dir(workbook_path(cfg.runs_dir) / cfg.run_name) if dist.is_main() else contextlib.nullcontext():
        return _fit(model, task, train_set, val_set, cfg, device)


def _fit(
    model: nn.Module, task: Task, train_set: Dataset, val_set: Dataset | None, cfg: TrainConfig, device: torch.device
) -> FitResult:
    run = _Run(model, task, train_set, val_set, cfg, device)
    with StopRequest() as stop, run.board, contextlib.ExitStack() as loaders:
        if run.pending_eval:
            run.evaluate_and_checkpoint(run.start_epoch)
        for epoch in range(run.start_epoch, cfg.epochs):
            stopped_by = run.train_epoch(epoch, stop, loaders)
            if stopped_by:
                return FitResult(run.run_dir, run.history, run.model, run.best, stopped_by=stopped_by)
            due = val_set is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
            run.checkpoint(epoch + 1, 0, pending_eval=due)  # the trained epoch is saved before it is evaluated
            if due:
                run.evaluate_and_checkpoint(epoch + 1)
    dist.barrier()
    return FitResult(run.run_dir, run.history, run.model, run.best)


class _Run:
    """One run of :func:`fit`: set up (or resumed) on creation, then trained epoch by epoch, evaluated,
    logged and checkpointed by its methods."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train_set: Dataset,
        val_set: Dataset | None,
        cfg: TrainConfig,
        device: torch.device,
    ) -> None:
        previous = check_run_dir(cfg)  # again under the lock: what the folder holds now
        self.steps_per_epoch = dataset_len(_loader(train_set, cfg, task.collate_fn, 0, train=True).batch_sampler)
        if self.steps_per_epoch == 0 and cfg.epochs:
            raise ValueError(
                f"{dataset_len(train_set)} training samples give no full batch of {cfg.batch_size}: "
                f"lower batch_size or add data"
            )
        self.task, self.train_set, self.val_set, self.cfg, self.device = task, train_set, val_set, cfg, device
        self.run_dir = workbook_path(cfg.runs_dir) / cfg.run_name
        self.ckpt_path, self.best_path = self.run_dir / "last.pt", self.run_dir / "best.pt"
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        seed_everything(cfg.seed)

        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=_channels_last_format(model))
        if cfg.sync_bn and dist.is_distributed():
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        base_lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_reference_batch)
        self.optimizer = torch.optim.SGD(
            param_groups(model, base_lr, cfg.lr_multipliers),
            lr=base_lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
        if cfg.log_every < 1:
            raise ValueError(f"log_every must be at least 1 optimizer step, got {cfg.log_every}")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_multiplier(
                cfg.schedule,
                cfg.epochs,
                self.steps_per_epoch,
                cfg.milestones,
                cfg.gamma,
                cfg.warmup_epochs,
                cfg.poly_power,
            ),
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

        self.start_epoch, self.skip = 0, 0  # where training goes on: epoch, and batches of it already trained
        self.history: list[dict] = []  # the rows of metrics.jsonl
        self.best: float | None = None  # the best main metric so far
        self.partial: tuple | None = None  # the loss sums and counters of an epoch stopped midway
        self.pending_eval = False
        resumed = cfg.resume and self.ckpt_path.is_file()
        resumes = self._resume(previous) if resumed else self._start(previous)
        for layer in planned_layers(model).values():  # after loading: the run's mode, whatever the checkpoint's
            layer.set_plan(cfg.pyconv_plan)
        if cfg.epochs == 0 and not any(row["kind"] == "eval" for row in self.history):
            self.pending_eval = val_set is not None  # epochs 0: only evaluate the weights the run starts from
        self.record: dict[str, Any] = {
            "train": dataclasses.asdict(cfg),
            "task": task.name,
            "model_args": getattr(model, "model_args", None),
            "resumed_at": [self.start_epoch, self.skip] if self.start_epoch or self.skip else None,
            "resumes": resumes,
            "lr_effective": base_lr,
            "environment": environment(device),
        }
        if dist.is_main():
            write_json(self.run_dir / "config.json", self.record)
            write_jsonl(self.run_dir / "metrics.jsonl", self.history)
        self.board = TensorBoardLog(
            self.run_dir,
            self.steps_per_epoch,
            self.history,
            self.start_epoch * self.steps_per_epoch + self.skip if resumed else None,
            self.record["train"],
            f"eval/{task.main_metric}",
            enabled=dist.is_main(),
        )

        if cfg.compile and any(layer.awaits_tuning() for layer in planned_layers(model).values()):
            with contextlib.closing(_loader(train_set, cfg, task.collate_fn, self.start_epoch, True)) as first:
                tune_plans_eagerly(model, task, next(iter(first)), device, cfg.amp)
        self.net = DistributedDataParallel(model) if dist.is_distributed() else model
        self.step_fn = cast(nn.Module, torch.compile(self.net)) if cfg.compile else self.net
        self.show = (
            cfg.progress and dist.is_main() and not os.environ.get("CI") and os.environ.get("PYCONV_PROGRESS") != "0"
        )

    def _resume(self, previous: dict[str, tuple[Any, Any]] | None) -> list[dict]:
        """Continue from ``last.pt``; returns config.json's record of this run's resumes, this one added."""
        cfg = self.cfg
        if previous:
            print(f"resuming {self.run_dir} with changed parameters: {describe_changes(previous)}")
        earlier = read_config(self.run_dir) or {}
        changes = changed_parameters(
            earlier.get("train", {}), dataclasses.asdict(cfg), ignore=("resume", "run_name", "runs_dir")
        )
        state = load_checkpoint(self.ckpt_path)
        diff = diff_state_dicts(self.model.state_dict(), state["model"])
        if diff:
            raise CheckpointMismatchError(
                diff.message(
                    str(self.ckpt_path),
                    "fit this run's model",
                    "Resume with the model parameters the run started with, or start a new run (another run_name).",
                )
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.skip, self.history, self.best = (
            state["epoch"],
            state["step_in_epoch"],
            state["history"],
            state["best"],
        )
        self.partial, self.pending_eval = state["partial_epoch"], state.get("pending_eval", False)
        set_rng_state(state["rng"])
        return [
            *earlier.get("resumes", []),
            {
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "at": [self.start_epoch, self.skip],
                "changed": {name: list(change) for name, change in changes.items()},
            },
        ]

    def _start(self, previous: dict[str, tuple[Any, Any]] | None) -> list[dict]:
        """Start from scratch (or from the ``weights`` the task loaded), removing an earlier run's checkpoints."""
        cfg = self.cfg
        if cfg.resume:
            print(f"resume=True but {self.ckpt_path} does not exist: starting run {cfg.run_name!r} from scratch")
        elif previous is not None:
            print(
                f"{self.run_dir} holds a run of the same parameters: training it again from scratch "
                f"(resume=True continues it instead)"
            )
        if dist.is_main():  # no checkpoint of an earlier run may outlive this one's start
            remove_checkpoint(self.ckpt_path)
            remove_checkpoint(self.best_path)
        return []

    def train_epoch(self, epoch: int, stop: StopRequest, loaders: contextlib.ExitStack) -> int:
        """Train ``epoch`` (its rest, after a stop midway), logging its step rows and its train row; returns 0,
        or the signal that stopped it, once ``last.pt`` holds where. ``loaders`` closes the loader on any exit."""
        cfg, per_epoch = self.cfg, self.steps_per_epoch
        skip, partial, self.partial = self.skip, self.partial, None
        if not skip:
            seed_everything(cfg.seed * 1_000_003 + epoch)
        loader = loaders.enter_context(
            contextlib.closing(_loader(self.train_set, cfg, self.task.collate_fn, epoch, train=True, skip_batches=skip))
        )
        self.net.train()
        # sums: the epoch's loss sums; window: those since the last step row (both saved at a stop, so a
        # resumed run writes the rows of an uninterrupted one); kept on the device (see DeviceSums)
        done, count, seen, elapsed, done_window, in_window = partial or ({}, 0, 0, 0.0, {}, 0)
        sums, window = DeviceSums(done), DeviceSums(done_window)
        window_losses: list[torch.Tensor] = []  # the losses since the last check, to name a non-finite one
        tic = time.perf_counter() - elapsed
        # tqdm.auto calls iter() on what it wraps when it is created, and again when it is iterated: given
        # the loader, that would start two worker pools per epoch. Given one iterator, both calls return it.
        bar = tqdm(
            iter(loader),
            total=len(loader),
            desc=f"{cfg.run_name} epoch {epoch + 1}/{cfg.epochs}",
            disable=not self.show,
            leave=False,
        )
        for step, batch in enumerate(bar, start=skip):
            losses = self._step(batch)
            window_losses.append(losses["loss"].detach().float())
            sums.add(losses)
            window.add(losses)
            count, in_window = count + 1, in_window + 1
            seen += batch_len(batch)
            row_due = (step + 1) % cfg.log_every == 0 or step + 1 == per_epoch
            # under DDP polling the signal is a collective (and a sync): only at step rows
            stop_signal = stop.requested(self.device) if row_due or not dist.is_distributed() else 0
            if row_due or stop_signal:  # the losses are checked once per window, not with a sync per step
                bad = first_nonfinite_loss(window_losses)
                if bad is not None:
                    at = step + 2 - len(window_losses) + bad[0]
                    raise self.diverged(f"loss is {bad[1]} at epoch {epoch + 1}, step {at}")
                window_losses.clear()
            if row_due:
                # under DDP each rank's own mean (rank 0's is written): an all_reduce here would add a
                # collective every log_every steps; the epoch's "train" row is the reduced mean
                lr = self.scheduler.get_last_lr()[0]
                self.log(
                    {
                        "kind": "step",
                        "epoch": epoch + (step + 1) / per_epoch,
                        "step": epoch * per_epoch + step + 1,
                        "lr": lr,
                        **means(window.values(), in_window),
                    }
                )
                window, in_window = DeviceSums(), 0
                if self.show:
                    bar.set_postfix(
                        loss=f"{sums.values()['loss'] / count:.3f}",
                        lr=f"{lr:.3g}",
                        img_s=f"{seen * dist.world_size() / (time.perf_counter() - tic):.0f}",
                    )
            if stop_signal:
                self.checkpoint(
                    epoch,
                    step + 1,
                    partial=(sums.values(), count, seen, time.perf_counter() - tic, window.values(), in_window),
                )
                print(
                    f"signal {stop_signal}: saved {self.ckpt_path} at epoch {epoch + 1}, step {step + 1}; "
                    f"rerun with resume=True (launcher: --resume true) to continue"
                )
                return stop_signal
        loader.close()  # its workers have ended; this releases them (an early exit: the ExitStack does)
        self.skip = 0
        row = {
            "kind": "train",
            "epoch": epoch + 1,
            "lr": self.scheduler.get_last_lr()[0],
            "seconds": time.perf_counter() - tic,
            **reduce_means(sums.values(), count, self.device),
        }
        row["samples_per_s"] = reduce_sum(seen, self.device) / row["seconds"]
        self.log(row)
        return 0

    def _step(self, batch: Any) -> dict[str, torch.Tensor]:
        """One optimizer step on ``batch`` (under the run's AMP); the task's losses."""
        with autocast(self.device, self.cfg.amp):
            losses = self.task.train_step(self.step_fn, batch, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return losses

    def evaluate_and_checkpoint(self, epochs_done: int) -> None:
        """Evaluate the epoch that ``last.pt`` already holds, then record it: ``best.pt`` is written
        before ``last.pt``, so a kill between the two leaves ``last.pt`` pending this evaluation and
        the resumed run redoes it (and rewrites ``best.pt``) instead of trusting a stale ``best.pt``."""
        assert self.val_set is not None, "an evaluation is due only with a validation set"
        metrics = evaluate(self.net, self.task, self.val_set, self.cfg, self.device)
        self.log({"kind": "eval", "epoch": epochs_done, **metrics})
        nonfinite = {k: v for k, v in metrics.items() if k.endswith("loss") and not math.isfinite(v)}
        if nonfinite:
            best_path, kept_best = self.best_path, self.best_path.is_file()
            kept = f"{best_path}, the best evaluated epoch, is kept" if kept_best else "No evaluated checkpoint exists"
            raise self.diverged(
                f"the evaluation after epoch {epochs_done} gives {nonfinite}, the model diverged",
                f"{kept}; {self.ckpt_path} holds epoch {epochs_done} unevaluated",
                best_path if kept_best else None,
            )
        value = metrics.get(self.task.main_metric)
        if value is not None and (self.best is None or value > self.best):
            self.best = value
            self.checkpoint(epochs_done, 0, self.best_path)
        self.checkpoint(epochs_done, 0)

    def checkpoint(
        self,
        epoch: int,
        step_in_epoch: int,
        path: Path | None = None,
        partial: tuple | None = None,
        pending_eval: bool = False,
    ) -> None:
        """Save the run's state to ``path`` (``last.pt``); a model whose weights are no longer finite is never saved."""
        bad = first_nonfinite(self.model)
        if bad is not None:
            when = f"at epoch {epoch + 1}, step {step_in_epoch}" if step_in_epoch else f"after epoch {epoch}"
            raise self.diverged(f"the weights are not finite {when} ({bad} is the first such tensor)")
        if dist.is_main():
            save_atomic(
                {
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "epoch": epoch,
                    "step_in_epoch": step_in_epoch,
                    "partial_epoch": partial,
                    "pending_eval": pending_eval,
                    "history": self.history,
                    "best": self.best,
                    "rng": rng_state(),
                    "config": dataclasses.asdict(self.cfg),
                    "model_args": getattr(self.model, "model_args", None),
                },
                path or self.ckpt_path,
            )
            write_json(self.run_dir / "config.json", {**self.record, "pyconv_plans": recorded_plans(self.model)})

    def log(self, row: dict) -> None:
        """Add a row to the history, ``metrics.jsonl`` and TensorBoard."""
        self.history.append(row)
        if dist.is_main():
            append_jsonl(self.run_dir / "metrics.jsonl", row)
            self.board.add(row)

    def diverged(self, what: str, kept: str = "", start: Path | None = None) -> NonFiniteLossError:
        """The error of a diverged run: what happened, the checkpoint kept (``start``: the one to go on from) and
        how to go on with a lower lr: a run from its weights, since a resume keeps the run's lr."""
        cfg = self.cfg
        if not kept:
            start = self.ckpt_path if self.ckpt_path.is_file() else None
            kept = f"The last good checkpoint {start} is kept" if start else "No checkpoint exists yet"
        lower = f"a lower lr than {cfg.lr:g} (per {cfg.lr_reference_batch} images; a resume keeps it)"
        how = (
            f"start a new run with weights={start} and {lower}"
            if start
            else f"train again with {lower} under another run_name, or delete {self.run_dir} first"
        )
        return NonFiniteLossError(f"run {cfg.run_name!r}: {what}. {kept}: {how}.")


@torch.no_grad()
def evaluate(
    model: nn.Module, task: Task, dataset: Dataset, cfg: TrainConfig, device: torch.device
) -> dict[str, float]:
    """The task's metrics on ``dataset`` (sharded over processes), in eval mode under the run's AMP."""
    model.eval()
    with (
        contextlib.closing(_loader(dataset, cfg, task.collate_fn, 0, train=False)) as loader,
        autocast(device, cfg.amp),
    ):
        return task.evaluate(model, loader, device)
