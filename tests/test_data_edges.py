"""Classification data as found in the wild: one label space for training and validation folders,
and predictions and galleries that keep dataset indices past a corrupt image."""

import logging
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from pyconv_core import plots
from pyconv_core.data.classification import collate_skipping_bad, imagenet_datasets
from pyconv_core.engine.logging import read_metrics
from pyconv_core.tasks import classification as C

CLASSES = ["n00000000", "n00000001", "n00000007"]


@pytest.fixture
def imagenet_copy(imagenet_dir, tmp_path):
    """A copy of the shared ImageNet-layout folder that a test may change."""
    return shutil.copytree(imagenet_dir, tmp_path / "imagenet")


def _model() -> nn.Module:
    """A fixed small classifier: predictions depend on the image only."""
    torch.manual_seed(0)
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 3)).eval()


def test_validation_without_a_class_folder_keeps_the_training_labels_and_scores(imagenet_dir, imagenet_copy, caplog):
    shutil.rmtree(imagenet_copy / "val" / "n00000001")
    (imagenet_copy / "train" / ".ipynb_checkpoints").mkdir()  # a hidden folder is not a class
    with caplog.at_level(logging.WARNING):
        train, val = imagenet_datasets(imagenet_copy, crop=32)
    assert train.classes == val.classes == CLASSES
    assert f"{imagenet_copy / 'val'} has no folder for 1 of the 3 training classes (n00000001)" in caplog.text
    assert sorted({label for _, label in val.samples}) == [0, 2]

    model = _model()
    _, full_val = imagenet_datasets(imagenet_dir, crop=32)
    predicted, truth = C.predict(model, full_val)
    present = (truth >= 0) & (truth != 1)
    metrics = C.ClassificationTask().evaluate(
        model, DataLoader(val, batch_size=8, collate_fn=collate_skipping_bad), torch.device("cpu")
    )
    assert metrics["num_samples"] == int(present.sum()) == 8
    assert metrics["top1"] == pytest.approx(100 * float((predicted[present] == truth[present]).float().mean()))


def test_a_validation_class_unknown_to_training_is_an_error_before_training(imagenet_copy, tmp_path):
    shutil.copytree(imagenet_copy / "val" / "n00000007", imagenet_copy / "val" / "n00000009")
    p = C.Params(data_dir=str(imagenet_copy), crop=32, epochs=1, batch_size=8, runs_dir=str(tmp_path / "runs"))
    folder = imagenet_copy / "val" / "n00000009"
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{folder.parent} has class folder(s) n00000009 (e.g. {folder}) that the training set does not have"
        ),
    ):
        C.run(p)
    assert not list(tmp_path.glob("runs/*/metrics.jsonl"))  # nothing was trained


def test_predictions_and_the_error_gallery_keep_dataset_indices_past_a_corrupt_image(imagenet_dir, caplog):
    _, val = imagenet_datasets(imagenet_dir, crop=32)
    bad = [path.name for path, _ in val.samples].index("n00000001_corrupt.JPEG")
    assert bad < len(val) - 1  # readable images follow it
    model = _model()
    with caplog.at_level(logging.WARNING):
        predicted, truth = C.predict(model, val, batch_size=5)
        assert val[bad] is None
    assert caplog.text.count("n00000001_corrupt.JPEG") == 1  # logged once, by path
    assert len(predicted) == len(truth) == len(val) and predicted[bad] == truth[bad] == -1
    readable = [i for i in range(len(val)) if i != bad]
    assert truth[readable].tolist() == [val.samples[i][1] for i in readable]
    with torch.no_grad():
        assert predicted[readable].tolist() == [int(model(val[i][0][None]).argmax()) for i in readable]

    wrong = [i for i in readable if predicted[i] != truth[i]]
    shown = [ax for ax in plots.show_misclassified(val, predicted, truth, val.classes).axes if ax.images]
    assert [ax.get_title() for ax in shown] == [
        f"true {val.classes[truth[i]]}\npred {val.classes[predicted[i]]}" for i in wrong
    ]
    for ax, i in zip(shown, wrong):
        image = val[i][0]
        expected = ((image - image.min()) / (image.max() - image.min() + 1e-8)).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), expected, rtol=1e-6)
    counts = plots.plot_confusion(predicted, truth, val.classes).collections[0].get_array()
    assert np.asarray(counts).sum() == pytest.approx(len(val.classes))  # rows normalised: -1 entries left out


def test_images_over_the_pixel_limit_are_skipped_and_counted_like_corrupt_ones(
    imagenet_copy, tmp_path, monkeypatch, caplog
):
    # PIL warns for an image over MAX_IMAGE_PIXELS and raises beyond twice that: both are skipped
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # the real images are 28x28 = 784 pixels
    for name, side in (("n00000000_warned.JPEG", 40), ("n00000000_refused.JPEG", 64)):
        Image.new("RGB", (side, side), (90, 90, 90)).save(imagenet_copy / "val" / "n00000000" / name)
    result = C.run(
        C.Params(
            data_dir=str(imagenet_copy),
            crop=32,
            epochs=1,
            batch_size=8,
            runs_dir=str(tmp_path / "runs"),
            run_name="bombs",
        )
    )
    evals = read_metrics(result.run_dir, "eval")[0]
    assert evals["num_skipped"] == 3 and evals["num_samples"] == 12  # the two large images and the corrupt one
    for name in ("n00000000_warned.JPEG", "n00000000_refused.JPEG"):
        assert name in caplog.text
    assert "MAX_IMAGE_PIXELS = 1500" in caplog.text
