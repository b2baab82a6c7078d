"""Kinetics-400 (Kay et al. 2017) in its released layouts, decoded with PyAV, sampled as in S-Section 2.

Layouts under ``root``:

* annotation CSV ``label,youtube_id,time_start,time_end,split`` at ``<root>/annotations/<split>.csv``
  or ``<root>/<split>.csv``, with the video files named ``<youtube_id>_<start:06d>_<end:06d>.<ext>``
  (or ``<youtube_id>.<ext>``) anywhere under ``<root>/<split>/``: flat (the CVDF mirror) or one
  folder per class (the ActivityNet crawler). Annotated videos without a file are counted and
  skipped (YouTube removals make a complete copy rare).
* no CSV: one folder per class, ``<root>/<split>/<label>/*.mp4``.

Sampling (S-Section 2): training clips of 16 frames taking every 4th frame from a random position,
short side random in [256, 320], random 224 crop, horizontal flip; validation during training:
the center clip, center crop (the paper's curves are "over independent clips"); test: up to 10
uniform clips x 3 crops along the long side, at short side 256. An item is a uint8 tensor
``[views, 3, frames, crop, crop]`` (the task normalizes on the device) and its label. A video that
PyAV cannot open or that ends early (truncated) is logged by path and yields ``None``;
:func:`collate_clips` drops it and counts it, so an epoch never stops on a bad file.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "ClipSampling",
    "KineticsDataset",
    "VideoBatch",
    "VideoDecodeError",
    "collate_clips",
    "decode_frames",
    "clip_starts",
    "ANNOTATION_COLUMNS",
    "KINETICS_MEAN",
    "KINETICS_STD",
]

log = logging.getLogger(__name__)
ANNOTATION_COLUMNS = ("label", "youtube_id", "time_start", "time_end", "split")
VIDEO_EXTENSIONS = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v"}
# Per-channel statistics of Kinetics frames in [0, 1] (as in SlowFast / PySlowFast).
KINETICS_MEAN, KINETICS_STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)
_SPLIT_NAMES = {"val": {"val", "validate", "validation"}}
_DECODE_ERRORS = (av.FFmpegError, OSError, IndexError, ValueError)


@dataclass(frozen=True)
class ClipSampling:
    """How clips are cut from a video (defaults: the paper's, S-Section 2)."""

    frames: int = 16  # frames per clip
    stride: int = 4  # take every stride-th frame
    train_short_side: tuple[int, int] = (256, 320)  # random short side (inclusive range) in training
    test_short_side: int = 256  # short side for validation and test
    crop: int = 224  # square crop side
    test_clips: int = 10  # at most this many uniform clips per test video
    test_crops: int = 3  # spatial crops per test clip (1: center; 3: both ends and center of the long side)
    flip: bool = True  # random horizontal flip in training (off where a mirror changes the label)

    def __post_init__(self) -> None:
        if self.crop > min(self.train_short_side[0], self.test_short_side):
            raise ValueError(
                f"crop {self.crop} is larger than the smallest short side "
                f"{min(self.train_short_side[0], self.test_short_side)} (train_short_side "
                f"{self.train_short_side}, test_short_side {self.test_short_side}); give short sides "
                f"of at least the crop, or a smaller crop"
            )
        if self.frames < 1 or self.stride < 1 or self.test_clips < 1 or self.test_crops < 1:
            raise ValueError(f"frames, stride, test_clips and test_crops must be positive: {self}")

    @property
    def span(self) -> int:
        """Frames of the video that one clip covers."""
        return (self.frames - 1) * self.stride + 1


class VideoDecodeError(RuntimeError):
    """A video that cannot be decoded to the frames a clip needs."""


class VideoBatch(NamedTuple):
    """Clips of several videos: ``clips[N, 3, T, H, W]`` uint8, ``views[B]`` clips per video (in order)."""

    clips: torch.Tensor
    labels: torch.Tensor
    views: torch.Tensor
    num_skipped: int


def clip_starts(num_frames: int, sampling: ClipSampling, mode: str) -> list[int]:
    """First frame of each clip: one random (train), the center one (val), or up to
    ``test_clips`` uniformly spaced distinct ones (test)."""
    last = max(0, num_frames - sampling.span)
    if mode == "train":
        return [int(torch.randint(last + 1, ()))]
    if mode == "val":
        return [last // 2]
    count = min(sampling.test_clips, last + 1)
    return sorted({round(i * last / max(1, count - 1)) for i in range(count)})


def _frame_count(container, stream, fps: float) -> int:
    if stream.frames:
        return int(stream.frames)
    if stream.duration is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    else:
        raise VideoDecodeError("the file gives neither a frame count nor a duration")
    return max(1, round(seconds * fps))


def _scaled(frame, short_side: int) -> np.ndarray:
    scale = short_side / min(frame.width, frame.height)
    width, height = max(1, round(frame.width * scale)), max(1, round(frame.height * scale))
    return frame.reformat(width=width, height=height, format="rgb24").to_ndarray()


def decode_frames(path: str | os.PathLike, choose: Callable[[int], Sequence[int]], short_side: int) -> np.ndarray:
    """Frames ``choose(num_frames)`` of a video, scaled to ``short_side``, as uint8 ``[N, H, W, 3]``.

    Frame indices come from timestamps (robust to seeking); only the needed frames are converted.
    Raises :class:`VideoDecodeError` when the file ends well before its declared length.
    """
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.guessed_rate or 30)
        num_frames = _frame_count(container, stream, fps)
        indices = [min(max(int(i), 0), num_frames - 1) for i in choose(num_frames)]
        wanted = sorted(set(indices))
        origin, time_base = stream.start_time or 0, float(stream.time_base)
        if wanted[0] > 0:
            container.seek(origin + int(wanted[0] / fps / time_base), stream=stream, backward=True)
        found, j, last, image = {}, 0, -1, None
        for count, frame in enumerate(container.decode(stream)):
            index = count if frame.pts is None else round((frame.pts - origin) * time_base * fps)
            if index < wanted[j]:
                continue
            image, last = _scaled(frame, short_side), index
            while j < len(wanted) and wanted[j] <= index:
                found[wanted[j]] = image
                j += 1
            if j == len(wanted):
                break
    if j < len(wanted):
        if image is None or num_frames - 1 - last > max(2, num_frames // 20):
            raise VideoDecodeError(f"truncated: frame {wanted[j]} of the declared {num_frames} is missing")
        found.update({w: image for w in wanted[j:]})
    return np.stack([found[i] for i in indices])


def _crop_boxes(height: int, width: int, crop: int, mode: str, crops: int) -> list[tuple[int, int]]:
    """Top-left corners of the crops: random (train), center (val), or ``crops`` along the long side (test)."""
    if mode == "train":
        return [(int(torch.randint(height - crop + 1, ())), int(torch.randint(width - crop + 1, ())))]
    center = ((height - crop) // 2, (width - crop) // 2)
    if mode == "val" or crops == 1:
        return [center]
    along_width = width >= height
    span = (width if along_width else height) - crop
    offsets = [round(i * span / (crops - 1)) for i in range(crops)]
    return [(center[0], o) if along_width else (o, center[1]) for o in offsets]


def _annotation_file(root: Path, split: str) -> Path | None:
    for candidate in (root / "annotations" / f"{split}.csv", root / f"{split}.csv"):
        if candidate.is_file():
            return candidate
    return None


def read_annotations(path: Path, split: str) -> list[tuple[str, list[str]]]:
    """``(label, file stems to look for)`` per row of ``split`` in a Kinetics annotation CSV."""
    names = _SPLIT_NAMES.get(split, {split})
    expected = ",".join(ANNOTATION_COLUMNS)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in ANNOTATION_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"annotation file {path} lacks the column(s) {', '.join(missing)} (header: "
                f"{','.join(header) or 'empty'}); a Kinetics annotation file starts with the header "
                f"line '{expected}'"
            )
        reader.fieldnames = header
        rows, splits = [], set()
        for line, row in enumerate(reader, start=2):
            try:
                label, youtube_id = row["label"].strip(), row["youtube_id"].strip()
                start, end = int(float(row["time_start"])), int(float(row["time_end"]))
            except (AttributeError, TypeError, ValueError) as err:
                raise ValueError(
                    f"annotation file {path}, line {line}: malformed row {row} ({err}); expected "
                    f"'{expected}' with integer times, e.g. 'abseiling,0347ZoDXyP0,14,24,train'"
                ) from err
            if not label or not youtube_id:
                raise ValueError(f"annotation file {path}, line {line}: empty label or youtube_id in {row}")
            splits.add((row["split"] or "").strip())
            if (row["split"] or "").strip() in names:
                rows.append((label, [f"{youtube_id}_{start:06d}_{end:06d}", youtube_id]))
    if not rows:
        raise ValueError(
            f"annotation file {path} has no rows of split {split!r} (its split column holds "
            f"{sorted(splits) or 'nothing'}); pass the file of that split"
        )
    return rows


def _index_videos(folder: Path) -> dict[str, Path]:
    """Video files under ``folder`` (recursively) by file stem."""
    found: dict[str, Path] = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = Path(dirpath) / name
            if path.suffix.lower() in VIDEO_EXTENSIONS:
                found.setdefault(path.stem, path)
    return found


class KineticsDataset(Dataset):
    """Clips of a Kinetics-layout folder (see the module doc).

    Args:
        root: the data folder holding ``<split>/`` (and ``annotations/`` for the CSV layout).
        split: ``train``, ``val`` (or any split name of the annotation file).
        mode: ``train`` (random clip), ``val`` (center clip and crop) or ``test`` (multi-view);
            default ``train`` for the train split, else ``val``.
        sampling: frames, stride, scales, crop and test views (:class:`ClipSampling`).
        classes: class names in label order; default: the sorted labels of this split (pass the
            training set's ``classes`` to a validation set).
        annotations: an explicit annotation CSV instead of the default locations.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        mode: str | None = None,
        sampling: ClipSampling = ClipSampling(),
        classes: Sequence[str] | None = None,
        annotations: str | os.PathLike | None = None,
    ) -> None:
        self.root, self.split = Path(root), split
        self.mode = mode or ("train" if split == "train" else "val")
        if self.mode not in ("train", "val", "test"):
            raise ValueError(f"mode must be 'train', 'val' or 'test', got {self.mode!r}")
        self.sampling = sampling
        folder = self.root / split
        csv_path = Path(annotations) if annotations else _annotation_file(self.root, split)
        if annotations and not Path(annotations).is_file():
            raise FileNotFoundError(
                f"annotation file {csv_path} does not exist; pass the Kinetics CSV "
                f"('{','.join(ANNOTATION_COLUMNS)}') of split {split!r}"
            )
        if csv_path is not None:
            rows = read_annotations(csv_path, split)
            videos = _index_videos(folder if folder.is_dir() else self.root)
            found = [(label, next((videos[s] for s in stems if s in videos), None)) for label, stems in rows]
            self.missing = sum(path is None for _, path in found)
            labelled = [(label, path) for label, path in found if path is not None]
            where = f"{csv_path} (files under {folder})"
        elif folder.is_dir() and any(d.is_dir() for d in folder.iterdir()):
            labelled = [
                (d.name, p)
                for d in sorted(folder.iterdir())
                if d.is_dir()
                for p in sorted(d.iterdir())
                if p.suffix.lower() in VIDEO_EXTENSIONS
            ]
            self.missing, where = 0, str(folder)
        else:
            raise FileNotFoundError(
                f"no Kinetics data for split {split!r} under {self.root}: expected an annotation file "
                f"{self.root / 'annotations' / f'{split}.csv'} (columns {','.join(ANNOTATION_COLUMNS)}) with the "
                f"videos under {folder}/, or one folder per class {folder}/<label>/*.mp4"
            )
        if not labelled:
            raise FileNotFoundError(
                f"none of the videos listed by {where} exist; expected files named "
                f"<youtube_id>_<start:06d>_<end:06d>.mp4 under {folder}"
            )
        if self.missing:
            log.warning(
                "%d of %d videos of %s are missing and skipped", self.missing, self.missing + len(labelled), where
            )
        self.classes = list(classes) if classes is not None else sorted({label for label, _ in labelled})
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted({label for label, _ in labelled} - set(index))
        if unknown:
            raise ValueError(
                f"{where} has labels outside the given classes ({len(self.classes)}, e.g. the "
                f"training set's): {unknown[:5]}; remove their videos (rows), or give training and "
                f"validation data of the same Kinetics version"
            )
        self.samples = [(path, index[label]) for label, path in labelled]
        self.num_skipped = 0

    def __len__(self) -> int:
        return len(self.samples)

    def _short_side(self) -> int:
        low, high = self.sampling.train_short_side
        return int(torch.randint(low, high + 1, ())) if self.mode == "train" else self.sampling.test_short_side

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.samples[index]
        s = self.sampling
        starts: list[int] = []

        def choose(num_frames: int) -> list[int]:
            starts.extend(clip_starts(num_frames, s, self.mode))
            return [start + i * s.stride for start in starts for i in range(s.frames)]

        try:
            frames = decode_frames(path, choose, self._short_side())
            boxes = _crop_boxes(frames.shape[1], frames.shape[2], s.crop, self.mode, s.test_crops)
        except (VideoDecodeError, *_DECODE_ERRORS) as err:
            self.num_skipped += 1
            log.warning(
                "skipping unreadable video %s (%s); %d skipped so far in this process", path, err, self.num_skipped
            )
            return None
        clips = torch.from_numpy(frames).view(len(starts), s.frames, *frames.shape[1:])
        views = [clip[:, y : y + s.crop, x : x + s.crop] for clip in clips for y, x in boxes]
        if self.mode == "train" and s.flip and torch.rand(()) < 0.5:
            views = [v.flip(2) for v in views]
        return torch.stack(views).permute(0, 4, 1, 2, 3).contiguous(), label


def collate_clips(samples: list) -> VideoBatch:
    """Batch the readable videos (their views concatenated); ``num_skipped`` counts the others."""
    good = [s for s in samples if s is not None]
    if not good:
        return VideoBatch(
            torch.empty(0, dtype=torch.uint8),
            torch.empty(0, dtype=torch.long),
            torch.empty(0, dtype=torch.long),
            len(samples),
        )
    return VideoBatch(
        torch.cat([c for c, _ in good]),
        torch.tensor([y for _, y in good]),
        torch.tensor([len(c) for c, _ in good]),
        len(samples) - len(good),
    )
