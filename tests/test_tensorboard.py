"""TensorBoard: every run writes its metrics.jsonl rows as scalars (``<kind>/<key>`` at the optimizer step)
and its parameters as hparams into runs/<name>/, read back here with TensorBoard's own readers; a run
resumed after a crash holds every row exactly once."""

import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util
from torch import nn

from pyconv_core.data.classification import FashionMNIST
from pyconv_core.engine.logging import EVENT_FILES, read_metrics
from pyconv_core.engine.trainer import TrainConfig, fit
from pyconv_core.tasks.classification import ClassificationTask

STEPS_PER_EPOCH = 4  # 64 images in batches of 16


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def _config(tmp_path, **overrides) -> TrainConfig:
    return TrainConfig(
        **{
            **dict(
                run_name="board",
                epochs=3,
                batch_size=16,
                lr=0.1,
                lr_reference_batch=16,
                schedule="cosine",
                log_every=1,
                runs_dir=str(tmp_path),
                progress=False,
                extra={"arch": "tiny", "depth": 3},
            ),
            **overrides,
        }
    )


def _fit(tmp_path, task=None, **overrides):
    return fit(
        _tiny_model(),
        task or ClassificationTask(),
        FashionMNIST("train", 16, 64),
        FashionMNIST("test", 16, 32),
        _config(tmp_path, **overrides),
    )


def _expected(run_dir) -> dict[str, list[tuple[int, float]]]:
    """What the event files must hold: every number of every metrics.jsonl row, once."""
    tags: dict[str, list[tuple[int, float]]] = {}
    for row in read_metrics(run_dir):
        step = row["step"] if row["kind"] == "step" else row["epoch"] * STEPS_PER_EPOCH
        for key, value in row.items():
            if key not in ("kind", "epoch", "step"):
                tags.setdefault(f"{row['kind']}/{key}", []).append((step, value))
    return tags


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """The scalars as TensorBoard's EventAccumulator reads them (all of them: no sampling)."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _served(run_dir) -> dict[str, list[tuple[int, float]]]:
    """The scalars as the TensorBoard server's accumulator keeps them (it purges on a session restart only)."""
    events = plugin_event_accumulator.EventAccumulator(str(run_dir), tensor_size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]
        for tag in events.Tags()["tensors"]
        if not tag.startswith("_hparams_")
    }


def _assert_holds(read: dict, expected: dict) -> None:
    assert sorted(read) == sorted(expected)
    for tag, points in expected.items():
        assert [s for s, _ in read[tag]] == [s for s, _ in points], tag
        np.testing.assert_allclose([v for _, v in read[tag]], [v for _, v in points], rtol=1e-6, err_msg=tag)


def test_a_run_writes_its_rows_and_parameters_as_tensorboard_events(tmp_path):
    run_dir = _fit(tmp_path).run_dir
    assert len(list(run_dir.glob(EVENT_FILES))) == 1
    expected = _expected(run_dir)
    assert {
        "step/train_loss",
        "step/lr",
        "train/samples_per_s",
        "train/train_loss",
        "eval/top1",
        "eval/val_loss",
    } <= set(expected)
    assert [s for s, _ in expected["step/train_loss"]] == list(range(1, 3 * STEPS_PER_EPOCH + 1))
    _assert_holds(_scalars(run_dir), expected)
    events = EventAccumulator(str(run_dir))
    events.Reload()
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info
    assert start.hparams["arch"].string_value == "tiny" and start.hparams["depth"].number_value == 3
    assert start.hparams["lr"].number_value == 0.1 and start.hparams["schedule"].string_value == "cosine"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/experiment"]
    ).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["eval/top1"]


class _Crash(Exception):
    pass


class _CrashAtStep(ClassificationTask):
    """Dies during global step ``at``, as a killed process does: rows past the last checkpoint are written."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.steps = at, 0

    def train_step(self, model, batch, device):
        self.steps += 1
        if self.steps == self.at:
            raise _Crash
        return super().train_step(model, batch, device)


def test_a_resumed_run_holds_every_row_once(tmp_path):
    with pytest.raises(_Crash):  # last.pt holds epoch 1 (step 4); the step rows 5 and 6 of epoch 2 are written
        _fit(tmp_path, _CrashAtStep(2 * STEPS_PER_EPOCH - 1))
    crashed = _scalars(tmp_path / "board")["step/train_loss"]
    assert [s for s, _ in crashed] == [1, 2, 3, 4, 5, 6]
    time.sleep(1.1)  # event files are read in name order, whose first field is the second they were opened
    run_dir = _fit(tmp_path, resume=True).run_dir
    assert len(list(run_dir.glob(EVENT_FILES))) == 2  # appended: the crashed run's file is kept
    expected = _expected(run_dir)
    assert [s for s, _ in expected["step/train_loss"]] == list(range(1, 3 * STEPS_PER_EPOCH + 1))
    _assert_holds(_scalars(run_dir), expected)
    _assert_holds(_served(run_dir), expected)
    _fit(tmp_path)  # the same parameters again from scratch: only the new run's events remain
    assert len(list(run_dir.glob(EVENT_FILES))) == 1
    _assert_holds(_scalars(run_dir), _expected(run_dir))
