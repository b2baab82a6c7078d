"""Galleries are sized from the data: the notebooks' image, box, mask and clip galleries draw
min(requested, available) items, so a small data set (or subset) never fails on a missing index."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest

from pyconv_core import build, plots
from pyconv_core.data.ade20k import ADE20K
from pyconv_core.data.coco import CocoDetection
from pyconv_core.data.demo_detection import DemoDetectionConfig, make_demo_coco
from pyconv_core.data.demo_segmentation import make_demo_ade20k
from pyconv_core.data.demo_video import DemoVideoConfig, make_demo_kinetics
from pyconv_core.data.kinetics import ClipSampling, KineticsDataset
from pyconv_core.tasks import detection, video
from pyconv_core.tasks.segmentation import SegmentationTask, segmentation_sample


def _drawn(fig: plt.Figure) -> int:
    """Panels of a figure that show a picture."""
    count = sum(1 for ax in fig.axes if ax.images)
    plt.close(fig)
    return count


def test_gallery_indices_take_what_the_data_has_spread_over_it():
    assert plots.gallery_indices(3, 6) == [0, 1, 2]
    assert plots.gallery_indices(10, 4) == [0, 3, 6, 9]
    assert plots.gallery_indices(1, 4) == [0] and plots.gallery_indices(0, 4) == []
    shown = plots.gallery_indices(288, 6)
    assert len(set(shown)) == 6 and shown[0] == 0 and shown[-1] == 287


def test_detection_gallery_of_fewer_images_than_requested(tmp_path):
    root = make_demo_coco(tmp_path / "coco", DemoDetectionConfig(num_train=4, num_val=3))
    val = CocoDetection(root, "val2017", train=False, size=64)
    model = build("ssd18", num_classes=len(val.class_names), image_size=64)
    samples = detection.predict(model, val, plots.gallery_indices(len(val), 6), 0.3)
    assert len(samples) == 3
    assert _drawn(plots.show_detections(samples, val.class_names)) == 2 * 3  # truth and prediction per image


def test_segmentation_gallery_of_fewer_images_than_requested(tmp_path):
    root = make_demo_ade20k(tmp_path / "ade", num_train=2, num_val=2)
    val = ADE20K(root, "validation")
    task = SegmentationTask(len(val.classes), crop=73, base_size=0)
    samples = [segmentation_sample(val, i, {}, task) for i in plots.gallery_indices(len(val), 4)]
    assert _drawn(plots.show_segmentation(samples, val.palette, val.classes)) == 2 * 2  # image and truth per row


@pytest.fixture(scope="module")
def few_videos(tmp_path_factory):
    """The demo's Kinetics layout with one short video per motion class."""
    root = make_demo_kinetics(
        tmp_path_factory.mktemp("kinetics"), DemoVideoConfig(train_per_class=1, val_per_class=1, frames=12, size=32)
    )
    return KineticsDataset(
        root,
        "train",
        sampling=ClipSampling(frames=2, stride=2, train_short_side=(32, 32), test_short_side=32, crop=32, flip=False),
    )


def test_video_gallery_of_fewer_videos_than_requested(few_videos):
    shown = plots.gallery_indices(len(few_videos), 12)
    assert shown == list(range(len(few_videos))) and len(shown) < 12
    model = build("resnet3d50", num_classes=len(few_videos.classes), stage_blocks=(1, 1, 1, 1))
    guesses = {"resnet3d50": video.predict_videos(model, few_videos, shown)}
    fig = video.show_clips(few_videos, shown, few_videos.classes, guesses)
    assert _drawn(fig) == len(few_videos)
