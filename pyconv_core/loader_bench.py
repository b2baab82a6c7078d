"""Input pipeline throughput: each task's training loader alone, at the paper's sizes, per worker count.

``python -m pyconv_core.bench --loader classification detection segmentation video --workers 0 2``

A GPU trains PyConvResNet-50 at thousands of images per second; whether ``num_workers`` CPU processes can
feed it is a question of the loaders alone. This times them without a model: each task's own training
set (the class and transforms a run uses, built by the task's ``datasets``) on data generated in the real
formats at the paper's sizes, under ``data/bench/`` (made once, then reused):

* classification: ImageNet folders of JPEGs 500x375 (ImageNet's typical size), RandomResizedCrop 224 + flip;
* detection: COCO json + 480x480 JPEGs, SSD300's augmentation (docs/paper.md s.1);
* segmentation: ADE20K layout, JPEGs and PNG masks 384-512 px a side, crop 473 after scale and rotation;
* video: Kinetics layout, H.264 mp4 of 96 frames at 320x320, clips of 16 frames at stride 4, crop 224.

The images are Fashion-MNIST items on generated textures (the demo sets' generators at these sizes), so a
JPEG decodes at the cost of its size, though photos with more fine detail decode somewhat slower.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pyconv_core.data.demo_detection import DemoDetectionConfig, make_demo_coco
from pyconv_core.data.demo_segmentation import make_demo_ade20k
from pyconv_core.data.demo_video import DemoVideoConfig, make_demo_kinetics
from pyconv_core.engine.logging import workbook_path
from pyconv_core.tasks import classification, detection, segmentation, video

__all__ = ["LOADER_TASKS", "training_set", "time_loader", "loader_bench", "format_loader_table"]

LOADER_TASKS = ("classification", "detection", "segmentation", "video")
IMAGENET_SIZE = (500, 375)  # width, height


def _imagenet_folder(root: Path, images: int) -> Path:
    """An ImageNet-layout folder (train/ and val/, two classes) of JPEGs at :data:`IMAGENET_SIZE`, made from
    the segmentation demo's images (real items on textures), unless already there."""
    if (root / "train").is_dir() and len(list((root / "train").glob("*/*.JPEG"))) == images:
        return root
    source = make_demo_ade20k(root.with_name(root.name + "-source"), num_train=images, num_val=1)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    files = sorted((source / "images" / "training").glob("*.jpg"))
    for split, chosen in (("train", files), ("val", files[:2])):
        for i, path in enumerate(chosen):
            folder = tmp / split / f"n0000000{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.open(path).convert("RGB").resize(IMAGENET_SIZE, Image.Resampling.BICUBIC)
            image.save(folder / f"{path.stem}.JPEG", quality=90)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def training_set(task: str, items: int = 64, folder: str = "data/bench") -> tuple[Dataset, Callable | None]:
    """The training set a ``task`` run reads (its ``datasets``, at the paper's sizes) over ``items`` generated
    images or videos, and the task's collate function."""
    root = workbook_path(folder)
    if task == "classification":
        p_cls = classification.Params(data_dir=str(_imagenet_folder(root / "imagenet", items)))
        return classification.datasets(p_cls)[0], classification.task_for(p_cls).collate_fn
    if task == "detection":
        coco = make_demo_coco(root / "coco", DemoDetectionConfig(num_train=items, num_val=2, image_size=480))
        p_det = detection.Params(data_dir=str(coco), recipe="paper", depth=50, image_size=300, augment=True)
        return detection.datasets(p_det)[0], detection.DetectionTask.collate_fn
    if task == "segmentation":
        ade = make_demo_ade20k(
            root / "ade20k",
            num_train=items,
            num_val=2,
            size_range=(384, 512),
            items_per_image=(6, 12),
            item_scale=(4.0, 8.0),
        )
        p_seg = segmentation.Params(data_dir=str(ade), recipe="ade20k", depth=50)
        return segmentation.datasets(p_seg)[0], segmentation.SegmentationTask.collate_fn
    if task == "video":
        per_class = max(1, items // 9)  # the demo's nine motion classes
        kinetics = make_demo_kinetics(
            root / "kinetics", DemoVideoConfig(train_per_class=per_class, val_per_class=1, frames=96, fps=25, size=320)
        )
        return video.datasets(video.Params(data_dir=str(kinetics)))[0], video.VideoTask.collate_fn
    raise ValueError(f"task must be one of {', '.join(LOADER_TASKS)}, got {task!r}")


def _endless(loader: DataLoader):
    while True:
        yield from loader


def time_loader(
    dataset: Dataset, collate_fn: Callable | None, workers: int, batch: int, seconds: float = 10.0
) -> dict[str, Any]:
    """Items per second that a DataLoader of ``workers`` processes (0: the main process) delivers over
    ``seconds``, in passes over the shuffled ``dataset``, after a first batch (the workers' start)."""
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate_fn,
        persistent_workers=workers > 0,
        drop_last=True,
    )
    batches = _endless(loader)
    next(batches)
    items, tic = 0, time.perf_counter()
    while time.perf_counter() - tic < seconds:
        next(batches)
        items += batch
    elapsed = time.perf_counter() - tic
    batches.close()
    return {
        "workers": workers,
        "items": items,
        "seconds": elapsed,
        "items_per_s": items / elapsed,
        "items_per_s_per_worker": items / elapsed / max(workers, 1),
    }


def loader_bench(
    tasks: Sequence[str],
    workers: Sequence[int],
    batch: int = 16,
    items: int = 64,
    seconds: float = 10.0,
    folder: str = "data/bench",
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """One row per (task, worker count): :func:`time_loader` on the task's :func:`training_set` (data in
    ``folder``, relative to the workbook root)."""
    rows = []
    for task in tasks:
        dataset, collate_fn = training_set(task, items, folder)
        for count in workers:
            row = {"task": task, "batch": batch, **time_loader(dataset, collate_fn, count, batch, seconds)}
            log(f"{task}: {count} workers, {row['items_per_s']:.1f} items/s")
            rows.append(row)
    return rows


def format_loader_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of :func:`loader_bench`'s rows."""
    lines = ["| task | workers | items/s | items/s per worker |", "|---|---|---|---|"]
    lines += [
        f"| {r['task']} | {r['workers']} | {r['items_per_s']:.1f} | {r['items_per_s_per_worker']:.1f} |" for r in rows
    ]
    return "\n".join(lines)
