"""A bad data set fails before the first epoch, not after it: the segmentation run checks every mask's
header and the validation masks' labels before training (detection checks its annotation files, video
and classification their class lists, at load: tests/test_detection_data.py, test_video_data.py,
test_data_edges.py). A mask that cannot be decoded is no error: it is skipped and counted, as in training."""

import logging
import time

import numpy as np
import pytest
from PIL import Image

from pyconv_core.data.ade20k import ADE20K
from pyconv_core.data.demo_segmentation import DEMO_CLASSES, make_demo_ade20k
from pyconv_core.tasks.segmentation import Params, run

TINY = dict(
    head="fcn",
    depth=18,
    output_stride=16,
    batch_size=4,
    crop=33,
    test_crop=73,
    epochs=1,
    pyconv_plan="naive",
    progress=False,
)


@pytest.fixture()
def demo(tmp_path):
    """A small ADE20K-layout folder (8 training and 3 validation pairs of the demo set's 14 classes)."""
    return make_demo_ade20k(tmp_path / "demo", num_train=8, num_val=3)


def _mask(root, split, index):
    return sorted((root / "annotations" / split).iterdir())[index]


def _wrong_size(path):
    with Image.open(path) as m:
        m.resize((m.width + 3, m.height)).save(path)


def _label_out_of_range(path):
    with Image.open(path) as m:
        label = np.array(m)
    label[0, 0] = len(DEMO_CLASSES) + 1
    Image.fromarray(label).save(path)


def _colour(path):
    with Image.open(path) as m:
        m.convert("RGB").save(path)


@pytest.mark.parametrize(
    "split, break_mask, message",
    [
        (
            "validation",
            _wrong_size,
            r"is \d+x\d+ but its mask .*ADE_val_00000002\.png is \d+x\d+: image and mask must "
            r"have the same size; fix or remove the pair before training",
        ),
        ("validation", _label_out_of_range, r"ADE_val_00000002\.png holds label 15 but the data set has 14 classes"),
        ("validation", _colour, r"ADE_val_00000002\.png is a RGB image"),
        ("training", _wrong_size, r"but its mask .*ADE_train_00000002\.png is"),
    ],
)
def test_a_bad_mask_stops_the_run_before_any_epoch_naming_the_file(demo, tmp_path, split, break_mask, message):
    """Without the check the run would train an epoch (writing last.pt and metrics.jsonl) and fail
    only when that epoch is evaluated, or when the training pair is met."""
    break_mask(_mask(demo, split, 1))
    p = Params(data_dir=str(demo), runs_dir=str(tmp_path / "runs"), run_name="bad", **TINY)
    tic = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        run(p)
    assert time.perf_counter() - tic < 30
    folder = tmp_path / "runs" / "bad"
    assert not (folder / "last.pt").exists() and not (folder / "metrics.jsonl").exists(), "an epoch ran"


def test_the_error_counts_the_other_bad_masks(demo):
    for index in range(3):
        _wrong_size(_mask(demo, "validation", index))
    with pytest.raises(ValueError, match=r"ADE_val_00000001\.png is .* \(2 more masks of validation fail this check\)"):
        ADE20K(demo, "validation").check()


def test_training_labels_are_left_to_the_read_and_validation_labels_are_checked(demo):
    """``labels=False`` reads headers only (a training set's masks are all read in its first epoch)."""
    _label_out_of_range(_mask(demo, "training", 0))
    train = ADE20K(demo, "training")
    train.check(labels=False)
    with pytest.raises(ValueError, match=r"ADE_train_00000001\.png holds label 15"):
        train.check()
    with pytest.raises(ValueError, match=r"ADE_train_00000001\.png holds label 15"):
        train.read(0)


def test_an_undecodable_mask_passes_the_check_logged_once_then_skipped(demo, caplog):
    path = _mask(demo, "validation", 1)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated: its header still reads
    val = ADE20K(demo, "validation")
    with caplog.at_level(logging.WARNING):
        val.check()
        assert val[1] is None and val[0] is not None
    assert caplog.text.count("ADE_val_00000002.png") == 1
