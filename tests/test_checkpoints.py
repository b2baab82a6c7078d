"""Checkpoints are data, never code; a trained epoch is saved before it is evaluated; best.pt never lags; a
damaged checkpoint is refused, never loaded; a full disk leaves the previous checkpoint."""

import os
import random
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyconv_core import CheckpointMismatchError, build, load_official_checkpoint
from pyconv_core.data.classification import FashionMNIST
from pyconv_core.engine import files
from pyconv_core.engine.checkpoint import (
    checksum_path,
    diff_state_dicts,
    load_checkpoint,
    rng_state,
    save_atomic,
    set_rng_state,
)
from pyconv_core.engine.logging import read_metrics
from pyconv_core.engine.trainer import TrainConfig, fit
from pyconv_core.models import ssd as S
from pyconv_core.run import load_run_model
from pyconv_core.tasks.classification import ClassificationTask, Params, datasets, train_config

TINY = dict(arch="resnet", depth=18, image_size=16, train_subset=256, val_subset=100, batch_size=32)


class _RunsCodeWhenUnpickled:
    """What a crafted checkpoint carries: unpickling it calls ``exec``, which here creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _crafted(path, marker):
    torch.save({"model": {"conv1.weight": _RunsCodeWhenUnpickled(marker)}, "epoch": 1}, path)
    return path


def test_a_crafted_pickle_would_run_code_when_loaded_unsafely(tmp_path):
    """The fixture is real: a plain pickle load executes it (so the tests below can fail)."""
    marker = tmp_path / "ran"
    torch.load(_crafted(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def _resume(tmp_path):
    p = Params(**TINY, epochs=1, runs_dir=str(tmp_path), run_name="victim", resume=True)
    train, val, _ = datasets(p)
    fit(build("resnet18", num_classes=10), ClassificationTask(), train, val, train_config(p))


LOADERS = {
    "resume": lambda path, tmp_path: _resume(tmp_path),
    "run model": lambda path, tmp_path: load_run_model(path.parent, "last"),
    "detection backbone": lambda path, tmp_path: S.load_backbone_checkpoint(build("ssd18"), path),
    "segmentation backbone": lambda path, tmp_path: build("fcn18", num_classes=3, backbone_weights=str(path)),
    "official weights": lambda path, tmp_path: load_official_checkpoint(build("pyconvresnet18"), path),
}


@pytest.mark.parametrize("path_name", sorted(LOADERS))
def test_no_load_path_runs_code_from_the_file_and_the_error_names_it(tmp_path, path_name):
    marker = tmp_path / "ran"
    (tmp_path / "victim").mkdir()
    path = _crafted(tmp_path / "victim" / "last.pt", marker)
    with pytest.raises((OSError, ValueError)) as caught:
        LOADERS[path_name](path, tmp_path)
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert str(path) in str(caught.value) and "weights-only" in str(caught.value)


def test_the_state_dict_diff_names_missing_unexpected_and_mis_shaped_keys_and_the_file():
    model = {
        "conv1.weight": torch.zeros(4, 3),
        "bn1.num_batches_tracked": torch.zeros(()),
        "fc.weight": torch.zeros(10, 4),
        "fc.bias": torch.zeros(10),
    }
    checkpoint = {"conv1.weight": torch.ones(4, 3), "fc.weight": torch.ones(7, 4), "head.weight": torch.ones(1)}
    diff = diff_state_dicts(model, checkpoint)
    assert diff.missing == ("fc.bias",) and diff.unexpected == ("head.weight",)
    assert diff.mismatched == ("fc.weight: checkpoint (7, 4) vs model (10, 4)",)
    assert diff_state_dicts(model, checkpoint, optional=()).missing == ("bn1.num_batches_tracked", "fc.bias")
    assert not diff_state_dicts(model, {k: v for k, v in model.items() if "num_batches" not in k})
    assert diff.message("runs/a/best.pt", "fit model resnet18", "Use weights of resnet18.").splitlines() == [
        "checkpoint runs/a/best.pt does not fit model resnet18:",
        "  1 missing: fc.bias",
        "  1 unexpected: head.weight",
        "  1 mis-shaped: fc.weight: checkpoint (7, 4) vs model (10, 4)",
        "  Use weights of resnet18.",
    ]
    many = diff_state_dicts({}, {f"k{i}": torch.zeros(1) for i in range(15)}).message("f.pt", "fit m", "Fix it.")
    assert "15 unexpected: k0, k1," in many and "k11 ... and 3 more" in many and "k12" not in many


def test_resuming_a_run_with_another_model_names_the_checkpoint_and_the_keys_that_differ(tmp_path):
    (tmp_path / "victim").mkdir()
    path = tmp_path / "victim" / "last.pt"
    torch.save({"model": build("resnet18", num_classes=3).state_dict(), "epoch": 1}, path)
    with pytest.raises(CheckpointMismatchError) as caught:
        _resume(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"checkpoint {path} does not fit this run's model:")
    assert "fc.weight: checkpoint (3, 512) vs model (10, 512)" in message
    assert message.endswith(
        "Resume with the model parameters the run started with, or start a new run (another run_name)."
    )


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    save_atomic({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random())
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()) == expected


class _EvaluationFails(ClassificationTask):
    """Evaluation breaks at its ``fail_on``-th call (as a bad validation file would)."""

    def __init__(self, fail_on: int) -> None:
        super().__init__()
        self.calls, self.fail_on = 0, fail_on

    def evaluate(self, model, loader, device):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("validation set broke")
        return super().evaluate(model, loader, device)


def _fit(tmp_path, name, task, resume=False):
    p = Params(**TINY, epochs=2, lr=0.4, runs_dir=str(tmp_path), run_name=name, resume=resume)
    train, val, _ = datasets(p)
    torch.manual_seed(0)
    return fit(build("resnet18", num_classes=10), task, train, val, train_config(p))


def test_a_failing_evaluation_keeps_the_trained_epoch_and_resume_evaluates_it(tmp_path):
    _fit(tmp_path, "straight", ClassificationTask())
    with pytest.raises(RuntimeError, match="validation set broke"):
        _fit(tmp_path, "broken", _EvaluationFails(fail_on=2))
    kept = load_checkpoint(tmp_path / "broken" / "last.pt")
    assert kept["epoch"] == 2 and kept["pending_eval"], "the trained epoch 2 was lost with its evaluation"
    _fit(tmp_path, "broken", ClassificationTask(), resume=True)
    for name in ("last.pt", "best.pt"):
        straight, resumed = load_checkpoint(tmp_path / "straight" / name), load_checkpoint(tmp_path / "broken" / name)
        assert (resumed["epoch"], resumed["best"], resumed["pending_eval"]) == (
            straight["epoch"],
            straight["best"],
            False,
        ), name
        for key, value in straight["model"].items():
            torch.testing.assert_close(resumed["model"][key], value, msg=f"{name} {key}")
    assert [(r["epoch"], r["top1"]) for r in read_metrics(tmp_path / "broken", "eval")] == [
        (r["epoch"], r["top1"]) for r in read_metrics(tmp_path / "straight", "eval")
    ]


def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_fix(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"weights": torch.arange(4096, dtype=torch.float32)}, path)
    shutil.copy(path, tmp_path / "copy.pt")
    data = bytearray(path.read_bytes())
    data[data.find(struct.pack("<f", 1000.0)) + 3] ^= 0x01  # one bit of one weight, as a disk error flips it
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["weights"][1000] != 1000.0  # torch itself loads it silently
    with pytest.raises(OSError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert f"checkpoint {path} is damaged" in message and checksum_path(path).name in message
    assert "restore both files from a copy, or delete them and start the run again" in message
    shutil.copy(tmp_path / "copy.pt", path)  # the advice works (starting again: tests/test_run_folders.py)
    assert load_checkpoint(path)["weights"][1000] == 1000.0


def test_an_unreadable_checksum_record_is_named_and_deleting_it_loads_the_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"weights": torch.ones(3)}, path)
    checksum_path(path).write_text("{ cut short")
    with pytest.raises(
        OSError,
        match=rf"checksum record {checksum_path(path)} cannot be read .*; delete it to load "
        rf"last.pt unchecked",
    ):
        load_checkpoint(path)
    checksum_path(path).unlink()  # the advice works
    assert torch.equal(load_checkpoint(path)["weights"], torch.ones(3))


def test_a_missing_checkpoint_names_those_its_folder_holds(tmp_path):
    save_atomic({"weights": torch.ones(3)}, tmp_path / "last.pt")
    with pytest.raises(
        FileNotFoundError,
        match=rf"checkpoint {tmp_path / 'best.pt'} does not exist \({tmp_path} "
        rf"holds last.pt\): give the path of one that exists",
    ):
        load_checkpoint(tmp_path / "best.pt")
    assert torch.equal(load_checkpoint(tmp_path / "last.pt")["weights"], torch.ones(3))  # the one it names loads


def test_a_kill_between_the_checksum_record_and_the_rename_leaves_a_checkpoint_that_loads(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"epoch": 1}, path)
    real_replace = os.replace

    def killed_at_the_rename(src, dst):
        if Path(dst) == path:
            raise KeyboardInterrupt  # the process dies here: no cleanup runs
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_rename)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1  # its record already names the new file, and still the old one
    assert list(tmp_path.glob(".last.pt.*.tmp"))
    with files.hold_run_dir(tmp_path):  # the next run in the folder removes the temp file the killed one left
        assert not list(tmp_path.glob(".*.tmp"))
    save_atomic({"epoch": 3}, path)
    assert load_checkpoint(path)["epoch"] == 3


def _launcher(tmp_path, *flags):
    args = [
        sys.executable,
        "-m",
        "pyconv_core.run",
        "classification",
        "--runs-dir",
        str(tmp_path),
        "--run-name",
        "full",
        *flags,
    ]
    return args + [arg for key, value in TINY.items() for arg in ("--" + key.replace("_", "-"), str(value))]


def test_a_checkpoint_over_the_file_size_limit_is_one_line_and_the_old_one_still_loads(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "PYCONV_PROGRESS": "0"}
    subprocess.run(_launcher(tmp_path, "--epochs", "1"), env=env, check=True, capture_output=True)
    last = tmp_path / "full" / "last.pt"
    limit = last.stat().st_size // 2  # room for config.json and metrics, not for the next checkpoint

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    launched = subprocess.run(
        _launcher(tmp_path, "--epochs", "2", "--resume", "true"),
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=limited,
    )
    assert launched.returncode == 1 and "Traceback" not in launched.stderr, launched.stderr[-3000:]
    line = launched.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot write {last}: it exceeds this process's file-size limit of ")
    assert "it needs about" in line and "MB" in line and "rerun with resume=True" in line
    assert not list(last.parent.glob(".*.tmp")), "a partial temp file was left"
    assert load_checkpoint(last)["epoch"] == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (mounting needs root: skipped otherwise)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("mounting a small tmpfs needs root")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def _small_fit(runs_dir, epochs, resume=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
    cfg = TrainConfig(
        run_name="full",
        epochs=epochs,
        batch_size=16,
        lr=0.1,
        lr_reference_batch=16,
        schedule="constant",
        runs_dir=str(runs_dir),
        progress=False,
        resume=resume,
    )
    return fit(model, ClassificationTask(), FashionMNIST("train", 16, 64), FashionMNIST("test", 16, 32), cfg)


def test_a_full_disk_is_one_line_saying_so_and_the_old_checkpoint_still_loads(small_disk):
    _small_fit(small_disk, epochs=1)
    last = small_disk / "full" / "last.pt"
    need = last.stat().st_size
    with open(small_disk / "filler", "wb") as filler:  # leave half of what the next checkpoint needs
        filler.write(b"\0" * (shutil.disk_usage(small_disk).free - need // 2))
    with pytest.raises(OSError) as caught:
        _small_fit(small_disk, epochs=2, resume=True)
    message = str(caught.value)
    assert message.startswith(f"cannot write {last}: the disk is full ({last.parent} has ") and "\n" not in message
    assert "this file needs about" in message and "free space there or point runs_dir at a larger disk" in message
    assert not list(last.parent.glob(".*.tmp")), "a partial temp file was left"
    assert load_checkpoint(last)["epoch"] == 1
