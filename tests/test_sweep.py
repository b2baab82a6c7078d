"""Sweeps from the notebooks: values typed and checked against the notebook's parameters before anything
runs, one executed notebook and run folders of its own per combination, finished combinations skipped,
failed ones reported while the others go on, and the sweep's runs in one comparison table."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pyconv_core.sweep import plan_sweep, read_grid

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "01_classification.ipynb"
# One network (baseline = arch: the notebook trains it once), one epoch on 256 images at 16 px: about 25 s
# per execution on a 2-core machine.
TINY = (
    "-p",
    "arch",
    "resnet",
    "-p",
    "baseline",
    "resnet",
    "-p",
    "epochs",
    "1",
    "-p",
    "train_subset",
    "256",
    "-p",
    "val_subset",
    "64",
    "-p",
    "batch_size",
    "32",
)
COMBINATIONS = ["lr=0.05,seed=0", "lr=0.05,seed=1", "lr=0.1,seed=0", "lr=0.1,seed=1"]


def test_values_are_typed_as_the_notebook_declares_them_and_checked(tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text("lr: [1, 0.5]\nrecipe: ['demo']\n")
    grid = read_grid(NOTEBOOK, [("epochs", "1,2"), ("channels_last", "true"), ("data_dir", "")], grid_file)
    assert grid == {"lr": [1.0, 0.5], "recipe": ["demo"], "epochs": [1, 2], "channels_last": [True], "data_dir": [""]}
    assert isinstance(grid["lr"][0], float)
    sweep, combinations = plan_sweep(NOTEBOOK, grid, runs_dir=tmp_path)
    assert sweep == "01_classification-lr-epochs"
    assert [c.name for c in combinations] == [
        "lr=1.0,epochs=1",
        "lr=1.0,epochs=2",
        "lr=0.5,epochs=1",
        "lr=0.5,epochs=2",
    ]
    first = combinations[0]
    assert first.notebook == tmp_path / sweep / "lr=1.0,epochs=1.ipynb"
    assert first.parameters == {
        "lr": 1.0,
        "recipe": "demo",
        "epochs": 1,
        "channels_last": True,
        "data_dir": "",
        "run_prefix": "01_classification-lr-epochs-lr=1.0,epochs=1-",
    }
    refused = {
        ("lrr", "0.1"): r"^-p lrr 0.1: 'lrr' is not a parameter of 01_classification.ipynb \(did you mean "
        r"'lr'\?\)",
        ("epochs", "1,x"): r"^-p epochs 1,x: epochs must be an integer \(or None: the recipe's\), got 'x' "
        r"\(lists, and values holding commas, go in a --grid YAML file\)$",
        ("progress", "yes"): r"^-p progress yes: progress must be True or False, got 'yes'",
        ("run_prefix", "a-"): r"^-p run_prefix a-: the sweep sets run_prefix",
        ("seed", "1,1"): r"^-p seed 1,1: a value is given twice",
    }
    for pair, message in refused.items():
        with pytest.raises(ValueError, match=message):
            read_grid(NOTEBOOK, [pair])
    with pytest.raises(ValueError, match=r"^-p lr 0.1: lr is given twice \(.*grid.yaml: lr\)"):
        read_grid(NOTEBOOK, [("lr", "0.1")], grid_file)
    grid_file.write_text("lr: 0.1\n")
    with pytest.raises(ValueError, match=r"grid.yaml: expected a mapping of parameter names to non-empty lists"):
        read_grid(NOTEBOOK, [], grid_file)


def _sweep(runs: Path, lrs: str, *args: str, image_size: str = "16") -> subprocess.CompletedProcess:
    """The sweep ``grid`` of lr ``lrs`` x seed 0,1 on the tiny notebook parameters, into ``runs``."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyconv_core.sweep",
            str(NOTEBOOK),
            *TINY,
            "-p",
            "image_size",
            image_size,
            "-p",
            "lr",
            lrs,
            "-p",
            "seed",
            "0,1",
            "--name",
            "grid",
            "--runs-dir",
            str(runs),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYCONV_PROGRESS": "0"},
    )
    print(done.stdout, done.stderr)
    return done


@pytest.mark.slow
def test_a_2x2_sweep_runs_four_notebooks_once_and_again_none(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copy(ROOT / "runs" / "README.md", runs)
    first = _sweep(runs, "0.05,0.1", "--parallel", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "4 ran, 0 skipped as finished, 0 failed" in first.stdout
    folder = runs / "grid"
    assert sorted(p.name for p in folder.glob("*.ipynb")) == [f"{name}.ipynb" for name in COMBINATIONS]
    table = pd.read_csv(folder / "comparison.csv", index_col="run")
    assert list(table.index) == [f"{name}-resnet18-demo-s{name[-1]}" for name in COMBINATIONS]
    assert list(table["lr"]) == [0.05, 0.05, 0.1, 0.1] and list(table["seed"]) == [0, 1, 0, 1]
    assert (table["epochs trained"] == 1).all() and table["final"].between(0, 100).all()
    for name in COMBINATIONS:
        assert (runs / f"grid-{name}-resnet18-demo-s{name[-1]}" / "best.pt").is_file()
    written = {p: p.stat().st_mtime_ns for p in [*folder.glob("*.ipynb"), *runs.glob("grid-*/metrics.jsonl")]}

    again = _sweep(runs, "0.05,0.1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 ran, 4 skipped as finished, 0 failed" in again.stdout and "lr=0.1,seed=1-resnet18-demo-s1" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in written} == written

    # A failing value: its combinations are reported and kept as .failed.ipynb, the exit status says so.
    failing = _sweep(runs, "0.05,0.1,-1")
    assert failing.returncode == 1
    assert "0 ran, 4 skipped as finished, 2 failed" in failing.stdout
    assert "failed: lr=-1.0,seed=0: ValueError: lr must be > 0 (or None: the recipe's), got -1.0" in failing.stdout
    assert sorted(p.name for p in folder.glob("*.failed.ipynb")) == [
        "lr=-1.0,seed=0.failed.ipynb",
        "lr=-1.0,seed=1.failed.ipynb",
    ]
    assert len(pd.read_csv(folder / "comparison.csv")) == 4

    # The same name with another fixed value is another experiment: refused before anything runs.
    other = _sweep(runs, "0.05,0.1", image_size="24")
    assert other.returncode == 1 and {p: p.stat().st_mtime_ns for p in written} == written
    assert "lr=0.05,seed=0.ipynb was executed with other parameters (image_size 16 -> 24): pass another --name" in (
        other.stderr
    )
