"""The one training loop of all four tasks (classification, detection, video, segmentation).

A task supplies ``train_step`` and ``evaluate`` (:class:`Task`); ``fit`` does the rest:
device, AMP (bf16, or fp16 with a grad scaler), channels_last, the layers' execution plans (PyConv's,
measured once per layer shape, recorded in config.json; the checkpoints carry them in the layers' state,
see :class:`PlannedLayer`), torch.compile, DDP under
torchrun (sharded sampler, optional SyncBatchNorm, metrics reduced, rank 0 writes), linear lr
scaling, warmup + multistep/cosine/poly schedules, ``runs/<name>/`` records, atomic
checkpoints every epoch plus ``best.pt``, exact resume, and a clean stop on NaN or a signal. A run may
start from ``weights`` (any checkpoint of the whole model); with ``epochs`` 0 it only evaluates them.

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
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from pyconv_core.engine import distributed as dist
from pyconv_core.engine.checkpoint import (
    diff_state_dicts,
    load_checkpoint,
    remove_checkpoint,
    rng_state,
    save_atomic,
    set_rng_state,
)
from pyconv_core.engine.files import check_run_dir_free, check_run_name, hold_run_dir
from pyconv_core.engine.logging import (
    TensorBoardLog,
    append_jsonl,
    changed_parameters,
    environment,
    read_config,
    unresumable,
    workbook_path,
    write_json,
    write_jsonl,
)
from pyconv_core.engine.schedules import lr_multiplier, scaled_lr
from pyconv_core.layers import factory
from pyconv_core.models.official import CheckpointMismatchError, load_model_weights

__all__ = ["TrainConfig", "FitResult", "Task", "PlannedLayer", "fit", "evaluate", "seed_everything", "param_groups",
           "tune_plans_eagerly", "check_run_dir", "NonFiniteLossError"]


@dataclass
class TrainConfig:
    """Everything that defines a training run; recorded whole in ``config.json``."""

    run_name: str
    epochs: int
    batch_size: int  # global batch (split over DDP processes)
    lr: float  # for a batch of lr_reference_batch; scaled linearly to batch_size
    lr_reference_batch: int = 256
    lr_multipliers: dict[str, float] = field(default_factory=dict)  # parameter-name prefix -> lr factor
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "multistep"  # multistep | cosine | poly | constant
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    poly_power: float = 0.9
    warmup_epochs: float = 0.0
    amp: str | None = None  # None | "bf16" | "fp16"
    channels_last: bool = False
    compile: bool = False
    pyconv_plan: str = "auto"  # how PyConv layers compute (layers/plans.py): auto | naive | e.g. "0|123"
    sync_bn: bool = False
    seed: int = 0
    resume: bool = False
    weights: str = ""  # checkpoint of the whole model to start from (models.official.load_model_weights)
    num_workers: int = 0
    eval_every: int = 1
    log_every: int = 10  # optimizer steps per "step" row of metrics.jsonl (the training-loss curve)
    runs_dir: str = "runs"  # relative paths are taken from the workbook root (engine.logging.workbook_path)
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # task parameters, recorded as given


@dataclass
class FitResult:
    run_dir: Path
    history: list[dict]
    model: nn.Module
    best_metric: float | None
    stopped_by: int | None = None  # the signal that stopped the run early (last.pt holds where), None if it finished


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


@runtime_checkable
class PlannedLayer(Protocol):
    """A layer that computes its forward by one of several equivalent execution plans (PyConv: layers/plans.py).
    The Trainer sets the run's plan mode on each, lets ``"auto"`` time its plans eagerly before torch.compile
    and records ``choices`` (input signature -> plan) in config.json; the plans travel in the layer's own
    state (its extra state), so checkpoints and resumes carry them without the Trainer."""

    choices: dict[str, str]

    def set_plan(self, plan: str) -> None: ...

    def awaits_tuning(self) -> bool: ...


def _planned_layers(model: nn.Module) -> dict[str, PlannedLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PlannedLayer)}


def _recorded_plans(model: nn.Module) -> dict[str, dict[str, str]]:
    """The plans chosen so far, per layer (module name) and input signature, for config.json."""
    return {name: dict(m.choices) for name, m in _planned_layers(model).items() if m.choices}


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; call it before building a model so that its init is reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and returns."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
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


class _Loader(DataLoader):
    """A DataLoader whose workers never see SIGTERM/SIGINT: they start with both blocked (a worker inherits
    the signal mask of the thread that starts it) and keep them blocked. A scheduler or Ctrl-C signals the
    whole process group; the main process saves and stops, while a worker killed by the signal would fail
    the step before the save (and print its traceback).

    Such workers cannot be ended by ``terminate()`` either, which is how torch and multiprocessing's exit
    handler end workers whose iterator was never shut down (e.g. one kept alive by the traceback of an
    error raised mid-epoch): the process would hang at exit. So the loader is closed on every way out of
    the code that iterates it (``with contextlib.closing(loader)``): :meth:`close` shuts down the workers
    of every iterator it started."""

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            iterator = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self.__dict__.setdefault("_started", []).append(iterator)
        return iterator

    def close(self) -> None:
        """Shut down the worker processes of the iterators this loader started (waits for them to exit)."""
        for iterator in self.__dict__.pop("_started", []):
            iterator._shutdown_workers()


class _SeededBatches(Dataset):
    """A training set whose random transforms draw, per batch, from torch's generator seeded by the run's
    seed, the epoch and the batch's first index; the process's own generator is restored afterwards. A
    batch's augmentation is then the same in any DataLoader worker or in the main process, and after a
    resume that skips the batches trained before the stop (worker w of a resumed epoch would otherwise
    continue another worker's random stream)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return _len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + indices[0])
            return [self.dataset[i] for i in indices]


class _DeviceSums:
    """Per-key sums of a run's step losses, kept where the losses are (in float64): adding a step's losses
    does not wait for the device, as ``float(loss)`` every step would; :meth:`values` reads them (once per
    step row). The sums equal Python floats added step by step (float32 values, float64 additions in order)."""

    def __init__(self, start: dict[str, float] | None = None) -> None:
        self.sums = {key: torch.tensor(value, dtype=torch.float64) for key, value in (start or {}).items()}

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for key, value in losses.items():
            value = value.detach().to(torch.float64)
            self.sums[key] = self.sums[key] + value if key in self.sums else value

    def values(self) -> dict[str, float]:
        return {key: float(value) for key, value in self.sums.items()}


def _first_nonfinite_loss(losses: list[torch.Tensor]) -> tuple[int, float] | None:
    """Position and value of the first NaN or infinite loss in ``losses`` (None: all finite), with one sync.
    The steps after such a loss only change weights that the checkpoints refuse to save."""
    if not losses:
        return None
    values = torch.stack(losses).tolist()
    return next(((i, v) for i, v in enumerate(values) if not math.isfinite(v)), None)


def _first_nonfinite(model: nn.Module) -> str | None:
    """The first parameter or buffer holding a NaN or inf (None: all finite), with one device sync."""
    state = {name: value for name, value in model.state_dict().items() if value.is_floating_point()}
    finite = torch.stack([torch.isfinite(value).all() for value in state.values()]).tolist()
    return next((name for name, ok in zip(state, finite) if not ok), None)


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
        raise ValueError(f"lr_multipliers prefixes {unmatched} match no parameter of {type(model).__name__}; "
                         f"its parameter names start with {tops}")
    return [{"params": params, "lr": base_lr * factor} for factor, params in factors.items() if params]


def tune_plans_eagerly(model: nn.Module, task: Task, batch: Any, device: torch.device, amp: str | None) -> None:
    """Measure ``"auto"`` training plans (:class:`PlannedLayer`) with one eager forward of ``batch`` (torch.compile
    traces the layers without timing them, so a compiled run would otherwise keep the naive plan).
    The loss is dropped and the pass's side effects (BN running statistics, RNG) are undone."""
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    rng = rng_state()
    model.train()
    with _autocast(device, amp):
        task.train_step(model, batch, device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    set_rng_state(rng)


def _len(sized: object) -> int:
    """``len`` of a data set or batch sampler (torch's types do not declare ``__len__`` on them)."""
    return len(cast(Sized, sized))


def _loader(dataset: Dataset, batch_size: int, cfg: TrainConfig, collate_fn, epoch: int, train: bool,
            skip_batches: int = 0) -> _Loader:
    """Epoch-seeded sharded loader: in training, rank r of W takes every W-th index of one
    permutation, so W processes see exactly the global batches of one process and an epoch's order
    is reproducible; in evaluation every sample is seen exactly once (no padding duplicates)."""
    sampler: Iterable[int]
    if train:
        shuffled: DistributedSampler[int] = DistributedSampler(
            dataset, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True, seed=cfg.seed, drop_last=True)
        shuffled.set_epoch(epoch)
        sampler = shuffled
    else:
        sampler = range(dist.rank(), _len(dataset), dist.world_size())
    per_rank = max(1, batch_size // dist.world_size())
    batches = list(BatchSampler(sampler, per_rank, drop_last=train))[skip_batches:]
    return _Loader(_SeededBatches(dataset, cfg.seed * 1_000_003 + epoch) if train else dataset, batch_sampler=batches,
                   num_workers=cfg.num_workers, collate_fn=collate_fn,
                   generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch),
                   persistent_workers=False, pin_memory=torch.cuda.is_available())


def check_run_dir(cfg: TrainConfig) -> dict[str, tuple[Any, Any]] | None:
    """What ``runs/<run_name>/`` holds, compared with ``cfg``: None (no run), ``{}`` (a run of the same
    parameters) or the parameters that differ (name -> (recorded, new)), which only ``resume=True``
    with a ``last.pt`` to continue may change, and only those a resume may change
    (``engine.logging.unresumable``). A folder of another run is refused otherwise, so a run never
    silently reuses, overwrites or continues another. Execution-only fields do not count
    (``engine.logging.EXECUTION_FIELDS``). A folder in which another process trains is refused too."""
    check_run_name(cfg.run_name)
    run_dir = workbook_path(cfg.runs_dir) / cfg.run_name
    if dist.launched_rank() == 0:  # only rank 0 holds the lock (and writes)
        check_run_dir_free(run_dir)
    recorded = read_config(run_dir)
    if recorded is None:
        return None
    changed = changed_parameters(recorded["train"], dataclasses.asdict(cfg))
    refused, resumable = unresumable(changed), (run_dir / "last.pt").is_file()
    another = "pick another run_name (notebooks: run_prefix) for these parameters"
    if changed and cfg.resume and resumable and refused:
        raise ValueError(f"{run_dir} cannot be resumed with {_describe(refused)}: a resume may only add epochs, "
                         f"change eval_every or how the run executes; resume with the recorded values, or {another}")
    if changed and not (cfg.resume and resumable):
        fix = (f"{another}, or resume=True to continue that run with them" if resumable and not refused else
               f"{another}, or delete {run_dir} to train them there")
        what = "it has no last.pt to resume" if cfg.resume else "its config.json records"
        raise ValueError(f"{run_dir} holds another run: {what} {_describe(changed)}; {fix}")
    return changed


def _describe(changed: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changed.items())


def _autocast(device: torch.device, amp: str | None):
    if amp not in (None, "bf16", "fp16"):
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp) if amp else None
    return torch.autocast(device.type, dtype=dtype, enabled=amp is not None)


def fit(model: nn.Module, task: Task, train_set: Dataset, val_set: Dataset | None, cfg: TrainConfig) -> FitResult:
    """Train ``model`` on ``train_set`` with ``task``'s step, evaluating on ``val_set``; see module doc.
    A folder that holds a run of the same parameters is trained again from scratch unless ``resume``.
    One process at a time trains in a folder: rank 0 holds its lock (``engine.files.hold_run_dir``)."""
    check_run_dir(cfg)  # before the process group starts: a folder in use is refused at once
    device = dist.init()
    with hold_run_dir(workbook_path(cfg.runs_dir) / cfg.run_name) if dist.is_main() else contextlib.nullcontext():
        return _fit(model, task, train_set, val_set, cfg, device)


def _fit(model: nn.Module, task: Task, train_set: Dataset, val_set: Dataset | None, cfg: TrainConfig,
         device: torch.device) -> FitResult:
    run = _Run(model, task, train_set, val_set, cfg, device)
    with _StopRequest() as stop, run.board, contextlib.ExitStack() as loaders:
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

    def __init__(self, model: nn.Module, task: Task, train_set: Dataset, val_set: Dataset | None, cfg: TrainConfig,
                 device: torch.device) -> None:
        previous = check_run_dir(cfg)  # again under the lock: what the folder holds now
        self.steps_per_epoch = _len(_loader(train_set, cfg.batch_size, cfg, task.collate_fn, 0, train=True)
                                    .batch_sampler)
        if self.steps_per_epoch == 0 and cfg.epochs:
            raise ValueError(f"{_len(train_set)} training samples give no full batch of {cfg.batch_size}: "
                             f"lower batch_size or add data")
        self.task, self.train_set, self.val_set, self.cfg, self.device = task, train_set, val_set, cfg, device
        self.run_dir = workbook_path(cfg.runs_dir) / cfg.run_name
        self.ckpt_path, self.best_path = self.run_dir / "last.pt", self.run_dir / "best.pt"
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        seed_everything(cfg.seed)

        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=factory.channels_last(getattr(model, "dim", 2)))
        if cfg.sync_bn and dist.is_distributed():
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        base_lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_reference_batch)
        self.optimizer = torch.optim.SGD(param_groups(model, base_lr, cfg.lr_multipliers), lr=base_lr,
                                         momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        if cfg.log_every < 1:
            raise ValueError(f"log_every must be at least 1 optimizer step, got {cfg.log_every}")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(
            cfg.schedule, cfg.epochs, self.steps_per_epoch, cfg.milestones, cfg.gamma, cfg.warmup_epochs,
            cfg.poly_power))
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

        self.start_epoch, self.skip = 0, 0  # where training goes on: epoch, and batches of it already trained
        self.history: list[dict] = []  # the rows of metrics.jsonl
        self.best: float | None = None  # the best main metric so far
        self.partial: tuple | None = None  # the loss sums and counters of an epoch stopped midway
        self.pending_eval = False
        resumed = cfg.resume and self.ckpt_path.is_file()
        resumes = self._resume(previous) if resumed else self._start(previous)
        for layer in _planned_layers(model).values():  # after loading: the run's mode, whatever the checkpoint's
            layer.set_plan(cfg.pyconv_plan)
        if cfg.epochs == 0 and not any(row["kind"] == "eval" for row in self.history):
            self.pending_eval = val_set is not None  # epochs 0: only evaluate the weights the run starts from
        self.record: dict[str, Any] = {
            "train": dataclasses.asdict(cfg), "task": task.name, "model_args": getattr(model, "model_args", None),
            "resumed_at": [self.start_epoch, self.skip] if self.start_epoch or self.skip else None,
            "resumes": resumes, "lr_effective": base_lr, "environment": environment(device)}
        if dist.is_main():
            write_json(self.run_dir / "config.json", self.record)
            write_jsonl(self.run_dir / "metrics.jsonl", self.history)
        self.board = TensorBoardLog(self.run_dir, self.steps_per_epoch, self.history,
                                    self.start_epoch * self.steps_per_epoch + self.skip if resumed else None,
                                    self.record["train"], f"eval/{task.main_metric}", enabled=dist.is_main())

        if cfg.compile and any(layer.awaits_tuning() for layer in _planned_layers(model).values()):
            with contextlib.closing(_loader(train_set, cfg.batch_size, cfg, task.collate_fn, self.start_epoch,
                                            True)) as first:
                tune_plans_eagerly(model, task, next(iter(first)), device, cfg.amp)
        self.net = DistributedDataParallel(model) if dist.is_distributed() else model
        self.step_fn = cast(nn.Module, torch.compile(self.net)) if cfg.compile else self.net
        self.show = (cfg.progress and dist.is_main() and not os.environ.get("CI")
                     and os.environ.get("PYCONV_PROGRESS") != "0")

    def _resume(self, previous: dict[str, tuple[Any, Any]] | None) -> list[dict]:
        """Continue from ``last.pt``; returns config.json's record of this run's resumes, this one added."""
        cfg = self.cfg
        if previous:
            print(f"resuming {self.run_dir} with changed parameters: {_describe(previous)}")
        earlier = read_config(self.run_dir) or {}
        changes = changed_parameters(earlier.get("train", {}), dataclasses.asdict(cfg),
                                     ignore=("resume", "run_name", "runs_dir"))
        state = load_checkpoint(self.ckpt_path)
        diff = diff_state_dicts(self.model.state_dict(), state["model"])
        if diff:
            raise CheckpointMismatchError(diff.message(
                str(self.ckpt_path), "fit this run's model", "Resume with the model parameters the run started "
                "with, or start a new run (another run_name)."))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.skip, self.history, self.best = (state["epoch"], state["step_in_epoch"],
                                                                state["history"], state["best"])
        self.partial, self.pending_eval = state["partial_epoch"], state.get("pending_eval", False)
        set_rng_state(state["rng"])
        return [*earlier.get("resumes", []), {"time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                              "at": [self.start_epoch, self.skip],
                                              "changed": {name: list(change) for name, change in changes.items()}}]

    def _start(self, previous: dict[str, tuple[Any, Any]] | None) -> list[dict]:
        """Start from scratch (or from ``weights``), removing an earlier run's checkpoints; no resumes yet."""
        cfg = self.cfg
        if cfg.resume:
            print(f"resume=True but {self.ckpt_path} does not exist: starting run {cfg.run_name!r} from scratch")
        elif previous is not None:
            print(f"{self.run_dir} holds a run of the same parameters: training it again from scratch "
                  f"(resume=True continues it instead)")
        if cfg.weights:  # before the folder is cleared (they may be an earlier run's checkpoint)
            load_model_weights(self.model, cfg.weights)
        if dist.is_main():  # no checkpoint of an earlier run may outlive this one's start
            remove_checkpoint(self.ckpt_path)
            remove_checkpoint(self.best_path)
        return []

    def train_epoch(self, epoch: int, stop: _StopRequest, loaders: contextlib.ExitStack) -> int:
        """Train ``epoch`` (its rest, after a stop midway), logging its step rows and its train row; returns 0,
        or the signal that stopped it, once ``last.pt`` holds where. ``loaders`` closes the loader on any exit."""
        cfg, per_epoch = self.cfg, self.steps_per_epoch
        skip, partial, self.partial = self.skip, self.partial, None
        if not skip:
            seed_everything(cfg.seed * 1_000_003 + epoch)
        loader = loaders.enter_context(contextlib.closing(
            _loader(self.train_set, cfg.batch_size, cfg, self.task.collate_fn, epoch, train=True, skip_batches=skip)))
        self.net.train()
        # sums: the epoch's loss sums; window: those since the last step row (both saved at a stop, so a
        # resumed run writes the rows of an uninterrupted one); kept on the device (see _DeviceSums)
        done, count, seen, elapsed, done_window, in_window = partial or ({}, 0, 0, 0.0, {}, 0)
        sums, window = _DeviceSums(done), _DeviceSums(done_window)
        window_losses: list[torch.Tensor] = []  # the losses since the last check, to name a non-finite one
        tic = time.perf_counter() - elapsed
        # tqdm.auto calls iter() on what it wraps when it is created, and again when it is iterated: given
        # the loader, that would start two worker pools per epoch. Given one iterator, both calls return it.
        bar = tqdm(iter(loader), total=len(loader), desc=f"{cfg.run_name} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not self.show, leave=False)
        for step, batch in enumerate(bar, start=skip):
            losses = self._step(batch)
            window_losses.append(losses["loss"].detach().float())
            sums.add(losses)
            window.add(losses)
            count, in_window = count + 1, in_window + 1
            seen += _batch_len(batch)
            row_due = (step + 1) % cfg.log_every == 0 or step + 1 == per_epoch
            # under DDP polling the signal is a collective (and a sync): only at step rows
            stop_signal = stop.requested(self.device) if row_due or not dist.is_distributed() else 0
            if row_due or stop_signal:  # the losses are checked once per window, not with a sync per step
                bad = _first_nonfinite_loss(window_losses)
                if bad is not None:
                    at = step + 2 - len(window_losses) + bad[0]
                    raise self.diverged(f"loss is {bad[1]} at epoch {epoch + 1}, step {at}")
                window_losses.clear()
            if row_due:
                # under DDP each rank's own mean (rank 0's is written): an all_reduce here would add a
                # collective every log_every steps; the epoch's "train" row is the reduced mean
                lr = self.scheduler.get_last_lr()[0]
                self.log({"kind": "step", "epoch": epoch + (step + 1) / per_epoch, "step": epoch * per_epoch + step + 1,
                          "lr": lr, **_means(window.values(), in_window)})
                window, in_window = _DeviceSums(), 0
                if self.show:
                    bar.set_postfix(loss=f"{sums.values()['loss'] / count:.3f}", lr=f"{lr:.3g}",
                                    img_s=f"{seen * dist.world_size() / (time.perf_counter() - tic):.0f}")
            if stop_signal:
                self.checkpoint(epoch, step + 1, partial=(sums.values(), count, seen, time.perf_counter() - tic,
                                                          window.values(), in_window))
                print(f"signal {stop_signal}: saved {self.ckpt_path} at epoch {epoch + 1}, step {step + 1}; "
                      f"rerun with resume=True (launcher: --resume true) to continue")
                return stop_signal
        loader.close()  # its workers have ended; this releases them (an early exit: the ExitStack does)
        self.skip = 0
        row = {"kind": "train", "epoch": epoch + 1, "lr": self.scheduler.get_last_lr()[0],
               "seconds": time.perf_counter() - tic, **_reduce_means(sums.values(), count, self.device)}
        row["samples_per_s"] = _reduce_sum(seen, self.device) / row["seconds"]
        self.log(row)
        return 0

    def _step(self, batch: Any) -> dict[str, torch.Tensor]:
        """One optimizer step on ``batch`` (under the run's AMP); the task's losses."""
        with _autocast(self.device, self.cfg.amp):
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
            raise self.diverged(f"the evaluation after epoch {epochs_done} gives {nonfinite}, the model diverged",
                                f"{kept}; {self.ckpt_path} holds epoch {epochs_done} unevaluated",
                                best_path if kept_best else None)
        value = metrics.get(self.task.main_metric)
        if value is not None and (self.best is None or value > self.best):
            self.best = value
            self.checkpoint(epochs_done, 0, self.best_path)
        self.checkpoint(epochs_done, 0)

    def checkpoint(self, epoch: int, step_in_epoch: int, path: Path | None = None, partial: tuple | None = None,
                   pending_eval: bool = False) -> None:
        """Save the run's state to ``path`` (``last.pt``); a model whose weights are no longer finite is never saved."""
        bad = _first_nonfinite(self.model)
        if bad is not None:
            when = f"at epoch {epoch + 1}, step {step_in_epoch}" if step_in_epoch else f"after epoch {epoch}"
            raise self.diverged(f"the weights are not finite {when} ({bad} is the first such tensor)")
        if dist.is_main():
            save_atomic({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                         "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": epoch,
                         "step_in_epoch": step_in_epoch, "partial_epoch": partial, "pending_eval": pending_eval,
                         "history": self.history, "best": self.best, "rng": rng_state(),
                         "config": dataclasses.asdict(self.cfg), "model_args": getattr(self.model, "model_args", None)},
                        path or self.ckpt_path)
            write_json(self.run_dir / "config.json", {**self.record, "pyconv_plans": _recorded_plans(self.model)})

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
        how = (f"start a new run with weights={start} and {lower}" if start else
               f"train again with {lower} under another run_name, or delete {self.run_dir} first")
        return NonFiniteLossError(f"run {cfg.run_name!r}: {what}. {kept}: {how}.")


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, dataset: Dataset, cfg: TrainConfig,
             device: torch.device) -> dict[str, float]:
    """The task's metrics on ``dataset`` (sharded over processes), in eval mode under the run's AMP."""
    model.eval()
    with contextlib.closing(_loader(dataset, cfg.batch_size, cfg, task.collate_fn, 0, train=False)) as loader, \
            _autocast(device, cfg.amp):
        return task.evaluate(model, loader, device)


def _batch_len(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return len(first)


def _means(sums: dict[str, float], count: float) -> dict[str, float]:
    """Per-step means as ``train_<key>``; ``num_*`` entries (e.g. skipped files) are totals."""
    return {k if k.startswith("num_") else f"train_{k}": float(v) if k.startswith("num_") else float(v) / count
            for k, v in sums.items()}


def _reduce_means(sums: dict[str, float], count: int, device: torch.device) -> dict[str, float]:
    """:func:`_means` over all processes."""
    keys = sorted(sums)
    packed = dist.all_reduce_sum(torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64, device=device))
    return _means(dict(zip(keys, packed[:-1].tolist())), float(packed[-1]))


def _reduce_sum(value: float, device: torch.device) -> float:
    return float(dist.all_reduce_sum(torch.tensor([value], dtype=torch.float64, device=device))[0])
