"""Compare runs: any set of run folders as one table and their curves drawn together.

A run folder (``runs/<name>/``, written by the Trainer) records its parameters in ``config.json`` and its
rows in ``metrics.jsonl``; that is all this module reads, so it compares runs of any notebook, the
launcher or a direct ``fit``, e.g. notebook 01's ResNet and PyConvResNet side by side (notebook 05).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from pyconv_core import plots
from pyconv_core.engine.logging import read_config, read_metrics, workbook_path

__all__ = ["find_runs", "compare_runs", "plot_runs", "main_metric"]

# What a run's folder name already says, and how it was written: never a difference worth a column.
_BOOKKEEPING = ("run_name", "runs_dir", "progress", "resume", "extra")

Runs = Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike]


def main_metric(task: str) -> str | None:
    """The metric that picks a ``task``'s ``best.pt`` (higher is better), e.g. ``top1``; None for a task
    this workbook does not define."""
    from pyconv_core.tasks.classification import ClassificationTask
    from pyconv_core.tasks.detection import DetectionTask
    from pyconv_core.tasks.segmentation import SegmentationTask
    from pyconv_core.tasks.video import VideoTask

    tasks = (ClassificationTask, DetectionTask, VideoTask, SegmentationTask)
    return {t.name: t.main_metric for t in tasks}.get(task)


def find_runs(runs_dir: str | os.PathLike = "runs", names: Sequence[str] = ()) -> dict[str, list[Path]]:
    """The run folders in ``runs_dir`` (relative to the workbook root), grouped by task, each group sorted
    by name: every folder holding ``config.json`` and ``metrics.jsonl``, or only those ``names``. An empty
    dict means there are no runs yet; a name that is not a run folder there is an error listing those found."""
    root = workbook_path(runs_dir)
    found = (
        {d.name: d for d in sorted(root.iterdir()) if (d / "config.json").is_file() and (d / "metrics.jsonl").is_file()}
        if root.is_dir()
        else {}
    )
    missing = [name for name in names if name not in found]
    if missing:
        raise ValueError(
            f"{', '.join(missing)}: no run folder of that name in {root} (a run folder holds "
            f"config.json and metrics.jsonl); the runs there: {', '.join(found) or 'none'}"
        )
    groups: dict[str, list[Path]] = {}
    for name in names or found:
        groups.setdefault((read_config(found[name]) or {}).get("task", "unknown"), []).append(found[name])
    return groups


def _labelled(run_dirs: Runs) -> dict[str, Path]:
    """Run folders by label: a mapping's keys, else each folder's name."""
    if isinstance(run_dirs, Mapping):
        return {label: Path(d) for label, d in run_dirs.items()}
    return {Path(d).name: Path(d) for d in run_dirs}


def _parameters(config: dict) -> dict[str, Any]:
    """A run's parameters: the task's as given (``extra``), then the Trainer's it did not set itself."""
    train = config.get("train", {})
    given = train.get("extra", {})
    return {
        k: v
        for k, v in {**given, **{k: v for k, v in train.items() if k not in given}}.items()
        if k not in _BOOKKEEPING
    }


def compare_runs(run_dirs: Runs) -> pd.DataFrame:
    """One row per run (indexed by its label: a mapping's key or the folder's name): its task and model,
    each parameter whose value differs between the runs, the evaluations and training epochs recorded, the
    final and best value of the task's main metric (with the epoch of the best), the training time
    (the epochs' seconds, evaluation excluded) and the training throughput (samples/s, mean over epochs).
    A run with no evaluation or no training epoch yet (e.g. an ``epochs 0`` evaluation) has NaN there."""
    runs = _labelled(run_dirs)
    configs = {label: read_config(d) or {} for label, d in runs.items()}
    params = {label: _parameters(config) for label, config in configs.items()}
    keys = list(dict.fromkeys(k for p in params.values() for k in p))
    differ = [k for k in keys if len({json.dumps(p.get(k), sort_keys=True, default=str) for p in params.values()}) > 1]
    rows = []
    for label, run_dir in runs.items():
        config, rows_of = configs[label], read_metrics(run_dir)
        metric = main_metric(config.get("task", "")) or ""
        evals = [r for r in rows_of if r["kind"] == "eval" and metric in r]
        train = [r for r in rows_of if r["kind"] == "train"]
        best = max(evals, key=lambda r: r[metric], default=None)
        rows.append(
            {
                "run": label,
                "task": config.get("task"),
                "model": (config.get("model_args") or {}).get("name"),
                **{k: params[label].get(k) for k in differ},
                "epochs trained": len(train),
                "evaluations": len(evals),
                "main metric": metric or None,
                "final": evals[-1][metric] if evals else np.nan,
                "best": best[metric] if best else np.nan,
                "best epoch": best["epoch"] if best else np.nan,
                "train time (s)": sum(r["seconds"] for r in train) if train else np.nan,
                "samples/s": float(np.mean([r["samples_per_s"] for r in train])) if train else np.nan,
            }
        )
    return pd.DataFrame(rows).set_index("run")


def plot_runs(run_dirs: Runs, metric: str | None = None, title: str | None = None) -> Sequence[plt.Axes] | None:
    """The runs' curves in the same panels (``plots.plot_curves``): the training loss every few steps and
    the validation ``metric`` per evaluation (default: the first run's main metric), one colour per run,
    e.g. a ResNet and its PyConv twin side by side. Runs without rows yet are left out; None if none has any."""
    runs = {label: d for label, d in _labelled(run_dirs).items() if read_metrics(d)}
    if not runs:
        return None
    metric = metric or main_metric((read_config(next(iter(runs.values()))) or {}).get("task", "")) or "val_loss"
    fig, ax_row = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    axes = plots.plot_curves(runs, panels=(("train", "train_loss"), ("eval", metric)), ax_row=ax_row[0])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return axes
