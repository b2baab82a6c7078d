"""Kinetics layout, PyAV decoding and clip sampling, bad files, the demo set, and the video task."""

import csv
import logging
import shutil

import av
import numpy as np
import pytest
import torch
from torch import nn

from pyconv_core.data.demo_video import MOTIONS, DemoVideoConfig, make_demo_kinetics, render_video, write_mp4
from pyconv_core.data.kinetics import (
    ANNOTATION_COLUMNS,
    ClipSampling,
    KineticsDataset,
    clip_starts,
    collate_clips,
    decode_frames,
)
from pyconv_core.engine.logging import read_metrics
from pyconv_core.tasks.video import Params, VideoTask, predict_videos, run, show_clips

SMALL = ClipSampling(
    frames=4, stride=3, train_short_side=(40, 48), test_short_side=40, crop=32, test_clips=3, test_crops=3
)


def _counter_video(path, frames=30, height=48, width=64, fps=12):
    """Frame i is uniformly grey at level 20 + 6 i: decoded levels tell which frames a clip took."""
    write_mp4(path, np.stack([np.full((height, width, 3), 20 + 6 * i, np.uint8) for i in range(frames)]), fps)


def _levels(clip):
    """Frame levels of a clip ``[3, T, H, W]``."""
    return [round((float(f.float().mean()) - 20) / 6) for f in clip.unbind(1)]


@pytest.fixture
def kinetics_dir(tmp_path):
    """A Kinetics layout: annotations/{train,val}.csv, flat <split>/<id>_<start>_<end>.mp4 (CVDF mirror)."""
    for split, count in (("train", 6), ("val", 3)):
        (tmp_path / split).mkdir()
        rows = []
        for i in range(count):
            youtube_id = f"vid{split[0]}{i:08d}"
            label = ("abseiling", "air drumming")[i % 2]
            _counter_video(tmp_path / split / f"{youtube_id}_{10 * i:06d}_{10 * i + 10:06d}.mp4")
            rows.append([label, youtube_id, 10 * i, 10 * i + 10, split])
        (tmp_path / "annotations").mkdir(exist_ok=True)
        with open(tmp_path / "annotations" / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([ANNOTATION_COLUMNS, *rows])
    return tmp_path


def test_decoding_returns_the_requested_frames_scaled_to_the_short_side(tmp_path):
    _counter_video(tmp_path / "v.mp4")
    frames = decode_frames(tmp_path / "v.mp4", lambda n: [0, 7, 7, 29, 12], 24)
    assert frames.shape == (5, 24, 32, 3) and frames.dtype == np.uint8
    assert [round((f.mean() - 20) / 6) for f in frames] == [0, 7, 7, 29, 12]


def test_training_clip_takes_every_stride_th_frame_from_a_random_start(kinetics_dir):
    data = KineticsDataset(kinetics_dir, "train", sampling=SMALL)
    assert data.classes == ["abseiling", "air drumming"] and len(data) == 6 and data.missing == 0
    starts = set()
    for _ in range(12):
        clips, label = data[1]
        assert clips.shape == (1, 3, 4, 32, 32) and clips.dtype == torch.uint8 and label == 1
        levels = _levels(clips[0])
        assert np.diff(levels).tolist() == [3, 3, 3]
        starts.add(levels[0])
    assert len(starts) > 1 and max(starts) <= 30 - SMALL.span


def test_test_mode_gives_uniform_clips_times_three_crops_along_the_long_side(kinetics_dir):
    data = KineticsDataset(kinetics_dir, "val", mode="test", sampling=SMALL)
    clips, _ = data[0]
    assert clips.shape == (9, 3, 4, 32, 32)
    assert [_levels(c)[0] for c in clips[::3]] == clip_starts(30, SMALL, "test") == [0, 10, 20]
    # frames are 40x53 at short side 40: the three crops start at x = 0, 10, 21 of a horizontal ramp
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (48, 1, 3))
    write_mp4(kinetics_dir / "val" / "vidv00000000_000000_000010.mp4", np.stack([ramp] * 30), 12)
    clips, _ = data[0]
    left, middle, right = (float(c.float().mean()) for c in clips[:3])
    assert left < middle < right
    assert KineticsDataset(kinetics_dir, "val", sampling=SMALL)[0][0].shape == (1, 3, 4, 32, 32)


def test_clip_starts_are_distinct_and_at_most_test_clips():
    paper = ClipSampling()
    assert clip_starts(300, paper, "test") == [round(i * 239 / 9) for i in range(10)]
    assert clip_starts(67, paper, "test") == [0, 1, 2, 3, 4, 5, 6]  # only 7 distinct 61-frame windows
    assert clip_starts(20, paper, "test") == [0] and clip_starts(20, paper, "val") == [0]


def test_unreadable_and_truncated_videos_are_skipped_and_counted(kinetics_dir, caplog):
    train = kinetics_dir / "train"
    (train / "vidt00000000_000000_000010.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    good = (train / "vidt00000001_000010_000020.mp4").read_bytes()
    (train / "vidt00000001_000010_000020.mp4").write_bytes(good[: len(good) // 3])
    data = KineticsDataset(kinetics_dir, "train", mode="val", sampling=SMALL)
    with caplog.at_level(logging.WARNING):
        samples = [data[i] for i in range(len(data))]
    assert samples[0] is None and samples[1] is None and all(s is not None for s in samples[2:])
    assert "vidt00000000_000000_000010.mp4" in caplog.text and "truncated" in caplog.text
    batch = collate_clips(samples)
    assert batch.num_skipped == 2 and batch.labels.tolist() == [0, 1, 0, 1] and batch.clips.shape[0] == 4
    assert collate_clips([None, None]).num_skipped == 2


def test_missing_files_are_counted_and_a_folder_per_class_works_without_csv(kinetics_dir, tmp_path_factory):
    (kinetics_dir / "train" / "vidt00000002_000020_000030.mp4").unlink()
    assert KineticsDataset(kinetics_dir, "train", sampling=SMALL).missing == 1
    folders = tmp_path_factory.mktemp("per_class")
    for label in ("jogging", "yoga"):
        (folders / "val" / label).mkdir(parents=True)
        _counter_video(folders / "val" / label / f"{label}.mp4", frames=12)
    data = KineticsDataset(folders, "val", sampling=SMALL)
    assert data.classes == ["jogging", "yoga"] and [y for _, y in data.samples] == [0, 1]
    assert data[1][0].shape == (1, 3, 4, 32, 32)


def test_missing_or_malformed_annotations_give_clear_errors(kinetics_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"annotations/val.csv"):
        KineticsDataset(tmp_path / "nowhere", "val")
    path = kinetics_dir / "annotations" / "train.csv"
    path.write_text("label,youtube_id,start,end,split\nabseiling,x,0,10,train\n")
    with pytest.raises(ValueError, match=r"train.csv lacks the column\(s\) time_start, time_end"):
        KineticsDataset(kinetics_dir, "train")
    path.write_text("label,youtube_id,time_start,time_end,split\nabseiling,x,zero,10,train\n")
    with pytest.raises(ValueError, match=r"train.csv, line 2: malformed row"):
        KineticsDataset(kinetics_dir, "train")
    path.write_text("label,youtube_id,time_start,time_end,split\nabseiling,x,0,10,test\n")
    with pytest.raises(ValueError, match="no rows of split 'train'"):
        KineticsDataset(kinetics_dir, "train")
    with pytest.raises(ValueError, match="outside the given classes"):
        KineticsDataset(kinetics_dir, "val", classes=["abseiling"])


def test_demo_set_is_real_mp4_in_kinetics_layout_and_reused(tmp_path):
    cfg = DemoVideoConfig(train_per_class=1, val_per_class=1, frames=12)
    root = make_demo_kinetics(tmp_path / "demo", cfg)
    rows = list(csv.reader(open(root / "annotations" / "train.csv")))
    assert tuple(rows[0]) == ANNOTATION_COLUMNS and sorted(r[0] for r in rows[1:]) == sorted(MOTIONS)
    first = root / "train" / rows[1][0] / f"{rows[1][1]}_000000_000001.mp4"
    with av.open(str(first)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.frames == 12 and stream.width == 64
    stamp = first.stat().st_mtime_ns
    make_demo_kinetics(tmp_path / "demo", cfg)
    assert first.stat().st_mtime_ns == stamp
    make_demo_kinetics(tmp_path / "demo", DemoVideoConfig(train_per_class=1, val_per_class=1, frames=12, seed=1))
    assert first.stat().st_mtime_ns != stamp
    data = KineticsDataset(root, "train", sampling=SMALL)
    assert data.classes == sorted(MOTIONS) and len(data) == len(MOTIONS)


def test_moving_items_move_in_their_labelled_direction():
    cfg = DemoVideoConfig()
    item = np.zeros((28, 28), np.uint8)
    item[8:20, 8:20] = 255
    for motion, sign in (("moving right", 1), ("moving left", -1)):
        frames = render_video(np.random.default_rng(0), item, motion, cfg)
        mass = frames.astype(float).sum(-1) - frames[0, 0, 0].astype(float).sum()
        xs = [(m.sum(0) * np.arange(cfg.size)).sum() / m.sum() for m in mass]
        assert np.sign(np.diff(xs)).tolist().count(sign) >= len(xs) - 3


def test_evaluation_averages_softmax_over_each_videos_views():
    """Two videos: the first has views voting 0, 0 (weakly) and 1 (strongly): the average picks 1."""
    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(2))
    clips = torch.zeros(4, 3, 1, 1, 1, dtype=torch.uint8)
    clips[2] = 255
    with torch.no_grad():
        model(torch.zeros(1, 3, 1, 1, 1))
        model[1].weight.copy_(torch.tensor([[0.0, 0, 0], [1.0, 1, 1]]))
        model[1].bias.copy_(torch.tensor([-5.8, 0.0]))
    batch = collate_clips([(clips[:3], 1), (clips[3:], 0)])
    logits, probs = VideoTask().scores(model.eval(), batch, torch.device("cpu"))
    expected = torch.stack([logits[:3].softmax(1).mean(0), logits[3].softmax(0)])
    torch.testing.assert_close(probs, expected)
    metrics = VideoTask().evaluate(model, [batch], torch.device("cpu"))
    assert metrics["top1"] == 100.0 and metrics["clip_top1_err"] == 50.0 and metrics["num_clips"] == 4


def test_an_epoch_with_bad_videos_runs_and_logs_the_count(kinetics_dir, tmp_path):
    (kinetics_dir / "train" / "vidt00000003_000030_000040.mp4").write_bytes(b"garbage")
    shutil.rmtree(kinetics_dir / "val")
    shutil.copytree(kinetics_dir / "train", kinetics_dir / "val")
    with open(kinetics_dir / "annotations" / "val.csv", "w") as f:
        f.write(open(kinetics_dir / "annotations" / "train.csv").read().replace(",train", ",val"))
    p = Params(
        arch="pyconvresnet3d50",
        data_dir=str(kinetics_dir),
        epochs=1,
        batch_size=3,
        frames=4,
        stride=3,
        crop=32,
        stage_blocks="1,1,1,1",
        runs_dir=str(tmp_path),
        run_name="bad",
        test_clips=2,
    )
    result = run(p)
    train, evals = read_metrics(result.run_dir, "train"), read_metrics(result.run_dir, "eval")
    assert train[0]["num_skipped"] == 1 and evals[0]["num_skipped"] == 1 and evals[0]["num_videos"] == 5
    assert np.isfinite(train[0]["train_loss"])


def test_predictions_and_frame_strips_keep_their_rows_past_a_bad_video(kinetics_dir):
    (kinetics_dir / "val" / "vidv00000001_000010_000020.mp4").write_bytes(b"garbage")
    train = KineticsDataset(kinetics_dir, "train", sampling=SMALL)
    val = KineticsDataset(kinetics_dir, "val", sampling=SMALL, classes=train.classes)
    torch.manual_seed(0)
    model = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(3, 2))
    probs = predict_videos(model, val, [0, 1, 2])
    assert probs.shape == (3, 2) and probs[1].isnan().all() and not probs[[0, 2]].isnan().any()
    torch.testing.assert_close(probs[[0, 2]], predict_videos(model, val, [0, 2]))
    titles = [ax.get_title(loc="left") for ax in show_clips(val, [0, 1, 2], train.classes, {"m": probs}).axes]
    assert titles[1] == "video 1: unreadable, skipped"
    for row in (0, 2):
        guess = train.classes[int(probs[row].argmax())]
        assert titles[row] == f"true: {train.classes[val.samples[row][1]]} | m: {guess} ({float(probs[row].max()):.0%})"


# ---- each message's advice, followed ----------------------------------------------------------------


def test_short_sides_of_at_least_the_crop_or_a_smaller_crop_are_accepted():
    with pytest.raises(
        ValueError,
        match=r"crop 64 is larger than the smallest short side 40 \(train_short_side "
        r"\(40, 48\), test_short_side 40\); give short sides of at least the crop, "
        r"or a smaller crop",
    ):
        ClipSampling(crop=64, train_short_side=(40, 48), test_short_side=40)
    assert ClipSampling(crop=64, train_short_side=(64, 72), test_short_side=64).crop == 64
    assert ClipSampling(crop=40, train_short_side=(40, 48), test_short_side=40).crop == 40


def test_annotation_files_fixed_as_their_messages_say_are_read(kinetics_dir):
    path = kinetics_dir / "annotations" / "train.csv"
    rows = path.read_text().splitlines()
    header = ",".join(ANNOTATION_COLUMNS)
    path.write_text("\n".join(["label,youtube_id,start,end,split", *rows[1:]]))
    with pytest.raises(ValueError, match=f"starts with the header line '{header}'$"):
        KineticsDataset(kinetics_dir, "train", sampling=SMALL)
    broken = rows[1].replace(",0,10,", ",zero,10,")
    path.write_text("\n".join([header, broken, *rows[2:]]))
    with pytest.raises(ValueError, match=f"expected '{header}' with integer times, e.g. "):
        KineticsDataset(kinetics_dir, "train", sampling=SMALL)
    path.write_text("\n".join(rows))
    assert len(KineticsDataset(kinetics_dir, "train", sampling=SMALL)) == 6


def test_the_annotation_file_of_the_split_passed_is_read(kinetics_dir, tmp_path_factory):
    own = tmp_path_factory.mktemp("csv") / "kinetics400_train.csv"
    shutil.move(kinetics_dir / "annotations" / "train.csv", own)
    shutil.copy(kinetics_dir / "annotations" / "val.csv", kinetics_dir / "annotations" / "train.csv")
    with pytest.raises(
        ValueError,
        match=r"has no rows of split 'train' \(its split column holds \['val'\]\); pass "
        r"the file of that split",
    ):
        KineticsDataset(kinetics_dir, "train", sampling=SMALL)
    with pytest.raises(FileNotFoundError, match="does not exist; pass the Kinetics CSV"):
        KineticsDataset(kinetics_dir, "train", sampling=SMALL, annotations=own.parent / "train.csv")
    assert len(KineticsDataset(kinetics_dir, "train", sampling=SMALL, annotations=own)) == 6


def test_data_put_where_the_layout_says_is_read(kinetics_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("kinetics")
    with pytest.raises(FileNotFoundError, match=f"expected an annotation file {root / 'annotations' / 'val.csv'} "):
        KineticsDataset(root, "val", sampling=SMALL)
    shutil.copytree(kinetics_dir / "annotations", root / "annotations")
    (root / "val").mkdir()
    for video in sorted((kinetics_dir / "val").iterdir()):
        shutil.copy(video, root / "val" / f"clip{len(list((root / 'val').iterdir()))}.mp4")
    with pytest.raises(FileNotFoundError, match=r"expected files named <youtube_id>_<start:06d>_<end:06d>.mp4 under "):
        KineticsDataset(root, "val", sampling=SMALL)
    shutil.rmtree(root / "val")
    shutil.copytree(kinetics_dir / "val", root / "val")  # the videos under their expected names
    assert len(KineticsDataset(root, "val", sampling=SMALL)) == 3


def test_videos_of_labels_outside_the_training_classes_removed_are_read(kinetics_dir):
    training_classes = ["abseiling"]  # a training set without the validation set's "air drumming"
    path = kinetics_dir / "annotations" / "val.csv"
    with pytest.raises(
        ValueError,
        match=r"has labels outside the given classes \(1, e.g. the training set's\): "
        r"\['air drumming'\]; remove their videos \(rows\)",
    ):
        KineticsDataset(kinetics_dir, "val", sampling=SMALL, classes=training_classes)
    rows = path.read_text().splitlines()
    path.write_text("\n".join(row for row in rows if not row.startswith("air drumming")))
    val = KineticsDataset(kinetics_dir, "val", sampling=SMALL, classes=training_classes)
    assert len(val) == 2 and val.classes == ["abseiling"]
