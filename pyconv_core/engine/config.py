"""A training run's configuration (:class:`TrainConfig`, recorded whole in ``config.json``) and what a run
folder may hold for it (:func:`check_run_dir`): nothing, the same run, or a run a resume may continue."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pyconv_core.engine import distributed as dist
from pyconv_core.engine.files import check_run_dir_free, check_run_name
from pyconv_core.engine.logging import changed_parameters, read_config, unresumable, workbook_path

__all__ = ["TrainConfig", "check_run_dir", "describe_changes"]


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
    weights: str = ""  # the whole model's starting weights, already loaded by the task (RunParams.load_weights)
    num_workers: int = 0
    eval_every: int = 1
    log_every: int = 10  # optimizer steps per "step" row of metrics.jsonl (the training-loss curve)
    runs_dir: str = "runs"  # relative paths are taken from the workbook root (engine.logging.workbook_path)
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # task parameters, recorded as given


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
        raise ValueError(
            f"{run_dir} cannot be resumed with {describe_changes(refused)}: a resume may only add epochs, "
            f"change eval_every or how the run executes; resume with the recorded values, or {another}"
        )
    if changed and not (cfg.resume and resumable):
        fix = (
            f"{another}, or resume=True to continue that run with them"
            if resumable and not refused
            else f"{another}, or delete {run_dir} to train them there"
        )
        what = "it has no last.pt to resume" if cfg.resume else "its config.json records"
        raise ValueError(f"{run_dir} holds another run: {what} {describe_changes(changed)}; {fix}")
    return changed


def describe_changes(changed: dict[str, tuple[Any, Any]]) -> str:
    """``name old -> new, ...`` for the messages about changed parameters."""
    return ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changed.items())
