"""Training curves: the Trainer's per-step rows (cadence, means, exact resume), one worker pool per
epoch, and the figures drawn from the rows (curves, class legend, confusion title)."""

import dataclasses
import multiprocessing
import os
import signal

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.ticker import MaxNLocator
from torch import nn

from pyconv_core import build, plots
from pyconv_core.data.ade20k import IGNORE_INDEX, palette_for
from pyconv_core.data.classification import FashionMNIST
from pyconv_core.engine.logging import read_metrics
from pyconv_core.engine.trainer import TrainConfig, fit
from pyconv_core.tasks.classification import ClassificationTask, Params, datasets, train_config

STEPS_PER_EPOCH, LOG_EVERY = 8, 4  # 256 images in batches of 32; log_every divides the epoch


@pytest.fixture(scope="module")
def fashion_run(tmp_path_factory):
    """A real two-epoch classification run on 256 Fashion-MNIST images at 16px, a step row every 4 steps."""
    p = Params(
        arch="resnet",
        depth=18,
        image_size=16,
        train_subset=256,
        val_subset=64,
        batch_size=32,
        epochs=2,
        runs_dir=str(tmp_path_factory.mktemp("curves")),
        run_name="fashion",
        progress=False,
    )
    train, val, classes = datasets(p)
    model = build(p.model_name, num_classes=len(classes))
    return fit(model, ClassificationTask(), train, val, dataclasses.replace(train_config(p), log_every=LOG_EVERY))


def _tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def _tiny_config(tmp_path, name: str, **overrides) -> TrainConfig:
    fields = dict(
        run_name=name,
        epochs=2,
        batch_size=16,
        lr=0.1,
        lr_reference_batch=16,
        schedule="cosine",
        runs_dir=str(tmp_path),
        progress=False,
    )
    return TrainConfig(**{**fields, **overrides})


def test_step_rows_come_every_log_every_steps_and_average_to_the_epoch(fashion_run):
    steps, epochs = read_metrics(fashion_run.run_dir, "step"), read_metrics(fashion_run.run_dir, "train")
    assert len(steps) == 2 * STEPS_PER_EPOCH // LOG_EVERY
    assert [r["step"] for r in steps] == list(range(LOG_EVERY, 2 * STEPS_PER_EPOCH + 1, LOG_EVERY))
    assert [r["epoch"] for r in steps] == pytest.approx([r["step"] / STEPS_PER_EPOCH for r in steps])
    assert all(a["epoch"] < b["epoch"] for a, b in zip(steps, steps[1:]))
    assert {"lr", "train_loss", "num_skipped"} <= set(steps[0])
    for epoch in epochs:
        own = [r["train_loss"] for r in steps if epoch["epoch"] - 1 < r["epoch"] <= epoch["epoch"]]
        assert epoch["train_loss"] == pytest.approx(np.mean(own), rel=1e-9)
    assert [r["kind"] for r in read_metrics(fashion_run.run_dir)] == ["step", "step", "train", "eval"] * 2


def test_the_last_short_window_of_an_epoch_gets_its_own_row(tmp_path):
    """With 4 steps an epoch and log_every=3: rows after steps 3 and 4 of each epoch (every step counted once)."""
    result = fit(
        _tiny_model(),
        ClassificationTask(),
        FashionMNIST("train", 16, 64),
        None,
        _tiny_config(tmp_path, "ragged", log_every=3),
    )
    steps = read_metrics(result.run_dir, "step")
    assert [r["step"] for r in steps] == [3, 4, 7, 8]
    assert [r["epoch"] for r in steps] == pytest.approx([0.75, 1.0, 1.75, 2.0])
    for epoch, (first, last) in zip(read_metrics(result.run_dir, "train"), zip(steps[::2], steps[1::2])):
        assert epoch["train_loss"] == pytest.approx((3 * first["train_loss"] + last["train_loss"]) / 4, rel=1e-9)


def test_evaluations_come_every_eval_every_epochs_and_after_the_last(tmp_path):
    """Each task's ``eval_every`` parameter reaches the Trainer: 5 epochs evaluated every 2 -> epochs 2, 4, 5."""
    from pyconv_core.tasks import detection, segmentation, video

    for module in (detection, segmentation, video):
        assert module.train_config(module.Params(eval_every=4)).eval_every == 4
    p = Params(image_size=16, train_subset=16, val_subset=16, epochs=5, eval_every=2, runs_dir=str(tmp_path))
    assert train_config(p).eval_every == 2
    result = fit(
        _tiny_model(),
        ClassificationTask(),
        FashionMNIST("train", 16, 16),
        FashionMNIST("test", 16, 16),
        _tiny_config(tmp_path, "sparse", epochs=5, eval_every=train_config(p).eval_every),
    )
    assert [r["epoch"] for r in read_metrics(result.run_dir, "eval")] == [2, 4, 5]
    assert [r["epoch"] for r in read_metrics(result.run_dir, "train")] == [1, 2, 3, 4, 5]


class _StopAtStep(ClassificationTask):
    """Sends this process SIGTERM during global step ``at``: the Trainer saves mid-epoch and returns."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.steps = at, 0

    def train_step(self, model, batch, device):
        self.steps += 1
        if self.steps == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().train_step(model, batch, device)


def test_a_run_stopped_between_step_rows_resumes_to_the_same_rows(tmp_path):
    data = FashionMNIST("train", 16, 128)  # 8 steps an epoch; stopped after step 5, 2 steps past the row of step 3
    torch.manual_seed(0)
    straight = fit(_tiny_model(), ClassificationTask(), data, None, _tiny_config(tmp_path, "straight", log_every=3))
    torch.manual_seed(0)
    stopped = fit(_tiny_model(), _StopAtStep(5), data, None, _tiny_config(tmp_path, "stopped", log_every=3))
    assert [r["step"] for r in read_metrics(stopped.run_dir, "step")] == [3]
    torch.manual_seed(0)
    fit(_tiny_model(), ClassificationTask(), data, None, _tiny_config(tmp_path, "stopped", log_every=3, resume=True))
    expected, resumed = read_metrics(straight.run_dir), read_metrics(stopped.run_dir)
    assert [(r["kind"], r.get("step")) for r in resumed] == [(r["kind"], r.get("step")) for r in expected]
    for want, got in zip(expected, resumed):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5), got
        assert got["epoch"] == want["epoch"] and got["lr"] == pytest.approx(want["lr"])


class _CountedFashionMNIST(FashionMNIST):
    """Counts ``__getitem__`` calls in a shared counter (the DataLoader's workers are other processes)."""

    def __init__(self, counter, *args) -> None:
        super().__init__(*args)
        self.counter = counter

    def __getitem__(self, index):
        with self.counter.get_lock():
            self.counter.value += 1
        return super().__getitem__(index)


def test_each_epoch_reads_every_sample_once_through_one_worker_pool(tmp_path):
    # tqdm.auto iterated a wrapped DataLoader twice: a second worker pool per epoch, whose prefetched
    # batches were read and thrown away.
    counter = multiprocessing.Value("i", 0)
    data = _CountedFashionMNIST(counter, "train", 16, 64)
    fit(_tiny_model(), ClassificationTask(), data, None, _tiny_config(tmp_path, "workers", num_workers=1))
    assert counter.value == 2 * 64


def test_loss_curve_has_a_point_per_step_row_on_integer_epoch_ticks(fashion_run):
    ax_loss, ax_err = plots.plot_curves(
        {"ResNet-18": fashion_run.run_dir}, panels=(("train", "train_loss"), ("eval", "top1_err"))
    )
    (line,) = [line for line in ax_loss.get_lines() if len(line.get_xdata())]  # seaborn adds empty legend lines
    assert len(line.get_xdata()) == len(read_metrics(fashion_run.run_dir, "step")) > 2  # more points than epochs
    assert len(ax_loss.collections[-1].get_offsets()) == 2  # the per-epoch means as markers
    ax_loss.figure.canvas.draw()
    for ax in (ax_loss, ax_err):
        assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
        assert all(float(tick).is_integer() for tick in ax.get_xticks()), ax.get_xticks()
        assert ax.get_xlabel() == "epoch"
    assert (ax_loss.get_title(), ax_loss.get_ylabel()) == ("training loss", "loss")
    assert (ax_err.get_title(), ax_err.get_ylabel()) == ("validation top-1 error (%)", "top-1 error (%)")
    plt.close("all")


def test_metric_labels_name_quantities_with_units():
    assert plots.metric_label("train", "train_cls") == ("training classification loss", "classification loss")
    assert plots.metric_label("eval", "AP50")[1] == "AP50 (%)"
    assert plots.metric_label("eval", "miou")[1] == "mIoU (%)"
    assert plots.metric_label("eval", "pixel_acc")[1] == "pixel accuracy (%)"
    assert plots.metric_label("eval", "some_new_metric")[1] == "some new metric"


def test_segmentation_figure_has_a_legend_of_the_classes_present():
    classes = ("wall", "floor", "sky", "tree")
    palette = palette_for(classes)
    truth = torch.tensor([[0, 0, 2], [2, IGNORE_INDEX, 2]])
    sample = {
        "image": np.zeros((2, 3, 3), np.uint8),
        "truth": truth,
        "preds": {"PyConvPH": torch.tensor([[0, 3, 2], [2, 2, 2]])},
    }
    fig = plots.show_segmentation([sample], palette, classes)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["wall", "sky", "tree", "ignored"]
    colours = [tuple(np.round(np.array(p.get_facecolor()[:3]) * 255).astype(int)) for p in legend.get_patches()]
    assert colours[:3] == [tuple(palette[i].astype(int)) for i in (0, 2, 3)]
    assert [t.get_text() for t in plots.show_segmentation([sample], palette).legends[0].get_texts()][0] == "class 0"
    plt.close("all")


def test_confusion_matrix_title_names_the_model():
    predicted, truth = torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0])
    assert "PyConvResNet-18" in plots.plot_confusion(predicted, truth, ("a", "b"), title="PyConvResNet-18").get_title()
    assert plots.plot_confusion(predicted, truth, ("a", "b")).get_title() == "Confusion matrix (row-normalised)"
    plt.close("all")
