"""Comparing runs: run folders found and grouped by task, one table of what differs and how each run did,
their curves in the same panels, and notebook 05 over such folders (or none)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from torch import nn

from pyconv_core.compare import compare_runs, find_runs, main_metric, plot_runs
from pyconv_core.data.classification import FashionMNIST
from pyconv_core.engine.logging import read_metrics
from pyconv_core.engine.trainer import TrainConfig, fit
from pyconv_core.models.official import load_model_weights
from pyconv_core.tasks.classification import ClassificationTask

ROOT = Path(__file__).resolve().parents[1]


def _fit(runs_dir: Path, name: str, arch: str, **overrides):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    cfg = TrainConfig(
        **{
            **dict(
                run_name=name,
                epochs=2,
                batch_size=16,
                lr=0.1,
                lr_reference_batch=16,
                schedule="cosine",
                log_every=2,
                runs_dir=str(runs_dir),
                progress=False,
                extra={"arch": arch, "depth": 18},
            ),
            **overrides,
        }
    )
    if cfg.weights:  # as a task does: the model starts from them, the run records their path
        load_model_weights(model, cfg.weights)
    return fit(model, ClassificationTask(), FashionMNIST("train", 16, 64), FashionMNIST("test", 16, 32), cfg).run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A runs folder as the notebooks leave it: two trained runs, an evaluation of one's last.pt with
    epochs 0, a folder without runs (the quickstart's figures) and a run that never wrote a row."""
    root = tmp_path_factory.mktemp("runs")
    resnet = _fit(root, "resnet-demo", "resnet")
    _fit(root, "pyconvresnet-demo", "pyconvresnet", lr=0.2)
    _fit(root, "resnet-demo-eval", "resnet", epochs=0, weights=str(resnet / "last.pt"))
    (root / "quickstart").mkdir()
    (root / "quickstart" / "pyramid.png").write_bytes(b"")
    (root / "started").mkdir()
    (root / "started" / "config.json").write_text(json.dumps({"task": "classification"}))
    return root


def test_runs_are_found_and_grouped_by_task(runs, tmp_path):
    assert find_runs(runs) == {
        "classification": [runs / "pyconvresnet-demo", runs / "resnet-demo", runs / "resnet-demo-eval"]
    }
    assert find_runs(runs, ["resnet-demo"]) == {"classification": [runs / "resnet-demo"]}
    with pytest.raises(ValueError, match=r"resnt: no run folder of that name in .*; the runs there: pyconvresnet"):
        find_runs(runs, ["resnt"])
    assert find_runs(tmp_path) == {} and find_runs(tmp_path / "absent") == {}
    assert main_metric("detection") == "AP" and main_metric("other") is None


def test_the_table_holds_what_differs_and_how_each_run_did(runs):
    table = compare_runs(find_runs(runs)["classification"])
    assert list(table.index) == ["pyconvresnet-demo", "resnet-demo", "resnet-demo-eval"]
    assert {"arch", "lr", "epochs", "weights"} <= set(table.columns) and "depth" not in table.columns
    assert table.loc["pyconvresnet-demo", "arch"] == "pyconvresnet" and table.loc["resnet-demo", "lr"] == 0.1
    for name in ("pyconvresnet-demo", "resnet-demo"):
        evals, train = read_metrics(runs / name, "eval"), read_metrics(runs / name, "train")
        row = table.loc[name]
        assert row["main metric"] == "top1" and row["final"] == evals[-1]["top1"]
        assert row["best"] == max(r["top1"] for r in evals) and row["epochs trained"] == 2
        assert row["train time (s)"] == pytest.approx(sum(r["seconds"] for r in train))
        assert row["samples/s"] == pytest.approx(np.mean([r["samples_per_s"] for r in train]))
    evaluated = table.loc["resnet-demo-eval"]
    assert evaluated["final"] == table.loc["resnet-demo", "final"] and evaluated["epochs trained"] == 0
    assert np.isnan(evaluated["train time (s)"]) and np.isnan(evaluated["samples/s"])
    labelled = compare_runs({"ResNet": runs / "resnet-demo", "PyConvResNet": runs / "pyconvresnet-demo"})
    assert list(labelled.index) == ["ResNet", "PyConvResNet"] and "weights" not in labelled.columns


def test_the_curves_of_all_runs_share_the_panels(runs):
    axes = plot_runs(
        {
            "ResNet": runs / "resnet-demo",
            "PyConvResNet": runs / "pyconvresnet-demo",
            "evaluated": runs / "resnet-demo-eval",
        },
        title="classification",
    )
    assert [ax.get_title() for ax in axes] == ["training loss", "validation top-1 accuracy (%)"]
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["ResNet", "PyConvResNet"]
    assert [t.get_text() for t in axes[1].get_legend().get_texts()] == ["ResNet", "PyConvResNet", "evaluated"]
    assert axes[0].figure.get_suptitle() == "classification"


def _papermill(out: Path, *params: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "papermill", str(ROOT / "notebooks" / "05_compare.ipynb"), str(out), *params],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out.read_text()


def test_the_notebook_compares_the_runs_it_finds_and_says_when_there_are_none(runs, tmp_path):
    executed = _papermill(tmp_path / "some.ipynb", "-p", "runs_dir", str(runs))
    assert "classification: 3 runs" in executed and "pyconvresnet-demo" in executed and "image/png" in executed
    empty = tmp_path / "empty"
    empty.mkdir()
    executed = _papermill(tmp_path / "none.ipynb", "-p", "runs_dir", str(empty))
    assert "No runs yet in" in executed and "image/png" not in executed
