"""Checkpoints are data, never code; a trained epoch is saved before it is evaluated; best.pt never lags."""
import random

import numpy as np
import pytest
import torch

from pyconv_core import build, load_official_checkpoint
from pyconv_core.engine.checkpoint import load_checkpoint, rng_state, save_atomic, set_rng_state
from pyconv_core.engine.logging import read_metrics
from pyconv_core.engine.trainer import fit
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
            straight["epoch"], straight["best"], False), name
        for key, value in straight["model"].items():
            torch.testing.assert_close(resumed["model"][key], value, msg=f"{name} {key}")
    assert [(r["epoch"], r["top1"]) for r in read_metrics(tmp_path / "broken", "eval")] == [
        (r["epoch"], r["top1"]) for r in read_metrics(tmp_path / "straight", "eval")]
