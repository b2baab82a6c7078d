"""Run records: config.json with provenance, metrics.jsonl rows, and reading them back (and comparing
a folder's recorded parameters with a new run's); the same rows as TensorBoard scalars."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from pyconv_core.engine.files import write_atomic

__all__ = [
    "workbook_path",
    "environment",
    "write_json",
    "append_jsonl",
    "write_jsonl",
    "read_metrics",
    "git_commit",
    "EXECUTION_FIELDS",
    "RESUMABLE_FIELDS",
    "read_config",
    "changed_parameters",
    "unresumable",
    "TensorBoardLog",
    "EVENT_FILES",
    "expectation",
]

_PACKAGES = ("torch", "torchvision", "numpy", "pycocotools", "av", "papermill", "seaborn", "tensorboard")


def workbook_path(path: str | os.PathLike) -> Path:
    """Resolve a relative path (``runs``, ``data/...``) against the workbook's root: the nearest
    folder at or above the working directory holding ``runs/README.md``. Notebooks run with their
    own folder as working directory (nbval, JupyterLab), and their runs still land in ``runs/``."""
    path = Path(path)
    if path.is_absolute():
        return path
    cwd = Path.cwd()
    for folder in (cwd, *cwd.parents):
        if (folder / "runs" / "README.md").is_file():
            return folder / path
    return cwd / path


def git_commit() -> str | None:
    """The commit of the working tree (with ``+dirty`` if it has changes), or None outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Provenance recorded in every run: git commit, python, packages, device."""
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    dev = {"type": device.type, "name": name, "cpu_threads": torch.get_num_threads()}
    return {
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "device": dev,
        "argv": sys.argv,
        "hostname": platform.node(),
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
    }


def write_json(path: Path, obj: Any) -> None:
    """Replace a json file atomically and durably (``engine.files.write_atomic``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(obj, indent=2, default=str).encode())


def append_jsonl(path: Path, row: dict) -> None:
    """Append one metrics row (flushed at once, so a killed run keeps every finished epoch)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, default=float) + "\n")
        f.flush()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Rewrite a metrics file whole (on resume: exactly the rows of the checkpoint's history)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r, default=float) + "\n" for r in rows).encode())


# Fields (of TrainConfig and of the tasks' Params) that say how a run executes, not what it learns:
# two runs that differ only in these are the same experiment.
# ``amp`` is not one of them: bf16 and fp16 change the numbers every step computes (fp16 also keeps a grad
# scaler), so runs under different amp are different experiments, and a resume keeps the run's amp.
EXECUTION_FIELDS = (
    "gpus",
    "run_name",
    "runs_dir",
    "num_workers",
    "progress",
    "resume",
    "pyconv_plan",
    "channels_last",
    "compile",
    "log_every",
    "ddp_timeout_s",
    "max_restarts",
)

# What a resume may change besides the execution fields: more ``epochs`` (the schedule is rebuilt over the
# new total from the step reached, see ``engine/trainer.py``) and ``eval_every`` (when evaluations happen).
# Any other change (the model, data, lr, batch, recipe, warmup, seed, amp, evaluation protocol, weights)
# would make the epochs after the resume another experiment than those before it.
RESUMABLE_FIELDS = ("epochs", "eval_every")


def read_config(run_dir: str | os.PathLike) -> dict | None:
    """A run folder's ``config.json``, or None where the folder holds no run."""
    path = Path(run_dir) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def changed_parameters(
    recorded: dict, train: dict, ignore: tuple[str, ...] = EXECUTION_FIELDS
) -> dict[str, tuple[Any, Any]]:
    """What differs between a recorded ``config.json`` "train" entry and a new one (a TrainConfig as a
    dict), as name -> (recorded, new): the task parameters (its ``extra``) where they differ, else the
    TrainConfig fields. ``ignore`` (by default :data:`EXECUTION_FIELDS`) and names that only one side has
    do not count."""
    train = json.loads(json.dumps(train, default=str))  # as config.json holds it: tuples as lists

    def differences(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
        return {k: (old[k], new[k]) for k in new if k in old and k != "extra" and k not in ignore and old[k] != new[k]}

    return differences(recorded.get("extra", {}), train.get("extra", {})) or differences(recorded, train)


def unresumable(changed: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    """The changes of :func:`changed_parameters` that a resume may not make: all but those of
    :data:`RESUMABLE_FIELDS`, and fewer ``epochs``."""
    return {
        name: (old, new)
        for name, (old, new) in changed.items()
        if name not in RESUMABLE_FIELDS or (name == "epochs" and new < old)
    }


EVENT_FILES = "events.out.tfevents.*"  # TensorBoard's event files in a run folder


class TensorBoardLog:
    """A run's metrics.jsonl rows as TensorBoard scalars, and its parameters as TensorBoard hparams, in
    ``runs/<name>/`` (``make tensorboard`` shows every run; metrics.jsonl stays the record).

    Every number of a row goes in as ``<kind>/<key>`` (``step/train_loss``, ``step/lr``, ``train/samples_per_s``,
    ``eval/top1``) at the optimizer step of the row: a step row's ``step``, a train or eval row's epoch times
    ``steps_per_epoch``; each row is flushed at once, as metrics.jsonl is. Every start opens a TensorBoard
    session (``purge_step``): a fresh run's at step 0, after removing the folder's earlier event files; a
    resumed run's at its optimizer step (``resumed_at``), which drops what the killed run wrote from that
    step on, and the checkpoint's rows from there are written again, so every row is there exactly once
    (TensorBoard takes a session start after the first as a restart). Disabled (``enabled=False``, DDP ranks
    other than 0), it writes nothing."""

    def __init__(
        self,
        run_dir: Path,
        steps_per_epoch: int,
        history: list[dict],
        resumed_at: int | None,
        hparams: dict[str, Any],
        metric: str,
        enabled: bool = True,
    ) -> None:
        """``hparams``: the run's TrainConfig as a dict (its task parameters, ``extra``, count one by one);
        ``metric``: the tag of the run's main metric (``eval/top1``)."""
        self.steps_per_epoch, self.writer = steps_per_epoch, None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        earlier = sorted(run_dir.glob(EVENT_FILES))
        if resumed_at is None or not earlier:
            for path in earlier:
                path.unlink()
            resumed_at = None
        self.writer = SummaryWriter(str(run_dir), purge_step=resumed_at or 0)
        if resumed_at is None:  # the parameters of the run as it started (task ones first); the metric: its main one
            given = {**hparams.get("extra", {}), **{k: v for k, v in hparams.items() if k != "extra"}}
            values = {
                k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v, default=str) for k, v in given.items()
            }
            file_writer: Any = self.writer.file_writer  # SummaryWriter's own writer (typed Optional)
            for summary in hparams_summaries(values, {metric: 0.0}):
                file_writer.add_summary(summary)
        for row in history:
            if self._step(row) >= (resumed_at or 0):
                self.add(row)

    def _step(self, row: dict) -> int:
        return int(row["step"]) if row["kind"] == "step" else round(row["epoch"] * self.steps_per_epoch)

    def add(self, row: dict) -> None:
        """Write one metrics.jsonl row."""
        if self.writer is None:
            return
        for key, value in row.items():
            if key not in ("kind", "epoch", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{row['kind']}/{key}", value, self._step(row))
        self.writer.flush()

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """Rows of ``runs/<name>/metrics.jsonl`` (only those of ``kind``, if given: "train" per epoch,
    "eval" per evaluation, "step" every few optimizer steps; see ``engine/trainer.py``)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: has the run {Path(run_dir).name!r} been trained?")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r.get("kind") == kind]


def expectation(what: str, value: float, at_least: float | None = None, at_most: float | None = None) -> str:
    """One line saying whether ``value`` meets a demo's expected result, e.g. ``"AP50 >= 50: met"``.

    The line names the bound but not the value when it is met, so it is the same text run after
    run: the notebooks print these lines in a cell whose output nbval compares (``NBVAL_CHECK_OUTPUT``),
    and a demo that stops learning turns the notebook test red. Not met, the line shows the value."""
    if (at_least is None) == (at_most is None):
        raise ValueError("give exactly one of at_least and at_most")
    if at_least is not None:
        bound, met = f">= {at_least:g}", value >= at_least
    else:
        assert at_most is not None
        bound, met = f"<= {at_most:g}", value <= at_most
    return f"{what} {bound}: met" if met else f"{what} {bound}: NOT met (got {value:.2f})"
