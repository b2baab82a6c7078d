"""COCO detection (Lin et al. 2014) in its real layout, with SSD's augmentation.

    <root>/train2017/*.jpg   <root>/val2017/*.jpg   <root>/annotations/instances_{train,val}2017.json

Annotations are read with pycocotools and checked when the data set is made, before any training:
an entry without a required field (image ``id``, ``file_name``, ``width``, ``height``; annotation
``image_id``, ``bbox``, ``category_id``; category ``id``, ``name``), a duplicate id or an annotation
of a category that ``categories`` does not list is an error naming the file, the entry and the fix.
What other tools' COCO exports often leave out is filled in and logged once per file: an
annotation's ``area`` (its box's), ``iscrowd`` (0) and ``id``. ``file_name`` is relative to
``<root>/<split>/`` and may hold folders (labelme writes ``JPEGImages/x.jpg``). Boxes are clipped
to the decoded image, whose size wins over the json's ``width``/``height`` (a disagreement is
logged once per file).

Category ids (1..90 with gaps for COCO) map to contiguous labels 1..K; 0 is the background. Crowd
boxes are left out of the training targets (COCOeval treats them as ignore regions on its own);
degenerate boxes and images whose file is missing are skipped with a logged count; an image that
cannot be decoded is logged by path and skipped when it is met, and counted (``num_skipped``,
:mod:`pyconv_core.data.unreadable`); images without annotations are kept (unless ``skip_empty``)
since COCOeval scores false positives on them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections import Counter
from pathlib import Path

import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms import v2

from pyconv_core.data.unreadable import UnreadableFileError, UnreadableFiles, open_image

__all__ = ["CocoDetection", "SSDRandomCrop", "ssd_transform", "detection_collate", "IMAGENET_MEAN", "IMAGENET_STD"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SSDRandomCrop(v2.RandomIoUCrop):
    """SSD's random min-IoU crop: torchvision's ``RandomIoUCrop`` (same options, trials and result
    distribution) with each round's trials drawn and tested at once, ~50x faster on a CPU."""

    def make_params(self, flat_inputs: list) -> dict:
        boxes = next(x for x in flat_inputs if isinstance(x, tv_tensors.BoundingBoxes))
        if not len(boxes):
            return {}  # no trial can keep a box centre: torchvision ends in "leave as is" as well
        height, width = boxes.canvas_size
        xyxy = v2.functional.convert_bounding_box_format(boxes.as_subclass(torch.Tensor), boxes.format, "XYXY")
        cx, cy = (xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2
        while True:
            min_iou = self.options[int(torch.randint(len(self.options), ()))]
            if min_iou >= 1.0:
                return {}
            scale = self.min_scale + (self.max_scale - self.min_scale) * torch.rand(self.trials, 2)
            new_w, new_h = (width * scale[:, 0]).long(), (height * scale[:, 1]).long()
            shift = torch.rand(self.trials, 2)
            left, top = ((width - new_w) * shift[:, 0]).long(), ((height - new_h) * shift[:, 1]).long()
            right, bottom = left + new_w, top + new_h
            aspect = new_w / new_h.clamp(min=1)
            inside = (left[:, None] < cx) & (cx < right[:, None]) & (top[:, None] < cy) & (cy < bottom[:, None])
            ious = box_iou(torch.stack([left, top, right, bottom], 1).to(xyxy.dtype), xyxy).masked_fill(~inside, -1.0)
            ok = (
                (new_w > 0)
                & (new_h > 0)
                & (aspect >= self.min_aspect_ratio)
                & (aspect <= self.max_aspect_ratio)
                & inside.any(1)
                & (ious.max(1).values >= min_iou)
            ).nonzero()
            if len(ok):
                i = int(ok[0])
                return dict(
                    top=int(top[i]),
                    left=int(left[i]),
                    height=int(new_h[i]),
                    width=int(new_w[i]),
                    is_within_crop_area=inside[i],
                )


def ssd_transform(train: bool, size: int = 300, max_expand: float = 4.0) -> v2.Compose:
    """SSD's augmentation for training (Liu et al. 2016, s.2.2 and 3.6: colour jitter, zoom-out
    expansion up to ``max_expand`` x (1: none), random min-IoU crop, horizontal flip), then resize
    to ``size`` x ``size`` and ImageNet normalization; for validation only the resize and normalization."""
    fill = tuple(round(255 * m) for m in IMAGENET_MEAN)
    expand = [v2.RandomZoomOut(fill=fill, side_range=(1.0, max_expand), p=0.5)] if max_expand > 1 else []
    augment = [v2.RandomPhotometricDistort(p=0.5), *expand, SSDRandomCrop(), v2.RandomHorizontalFlip()] if train else []
    return v2.Compose(
        [
            *augment,
            v2.Resize((size, size), antialias=True),
            v2.SanitizeBoundingBoxes(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class CocoDetection(Dataset):
    """One split of a COCO-layout folder; items are ``(image, target)``, or ``None`` for an image
    file that cannot be decoded (:func:`detection_collate` drops and counts it).

    ``image`` is the transformed ``[3, size, size]`` tensor; ``target`` holds ``boxes`` ``[K, 4]``
    (xyxy, normalized to [0, 1]), ``labels`` ``[K]`` (1..K contiguous), ``image_id`` and
    ``orig_size`` (height, width) for mapping detections back to COCO pixels.

    Args:
        root: folder with ``<split>/`` and ``annotations/instances_<split>.json``.
        split: ``train2017`` or ``val2017`` (any name with that layout).
        train: apply SSD's augmentation.
        size: model input side.
        skip_empty: leave out images without usable boxes (for training).
        max_expand: largest zoom-out of the augmentation (SSD: 4; small demo images: less).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "val2017",
        train: bool = False,
        size: int = 300,
        skip_empty: bool = False,
        max_expand: float = 4.0,
    ) -> None:
        self.root, self.split = Path(root), split
        self.image_dir = self.root / split
        self.ann_file = ann_file = self.root / "annotations" / f"instances_{split}.json"
        self.coco = _load_coco(ann_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"image folder {self.image_dir} is missing; the COCO layout is "
                f"<root>/{split}/*.jpg next to <root>/annotations/instances_{split}.json"
            )
        cat_ids = sorted(self.coco.getCatIds())
        self.cat_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.label_to_cat = {i: c for c, i in self.cat_to_label.items()}
        self.class_names = ("background", *(self.coco.cats[c]["name"] for c in cat_ids))
        self.transform = ssd_transform(train, size, max_expand)
        self.unreadable, self._size_logged = UnreadableFiles(), False
        self.skipped: Counter = Counter()
        self.items: list[tuple[int, str, torch.Tensor, torch.Tensor]] = []
        missing = []
        for image_id in sorted(self.coco.getImgIds()):
            file_name = self._file_name(self.coco.imgs[image_id]["file_name"])
            if file_name is None:
                self.skipped["missing_image"] += 1
                missing.append(self.image_dir / self.coco.imgs[image_id]["file_name"])
                continue
            boxes, labels = self._targets(image_id)
            if skip_empty and not len(labels):
                self.skipped["empty_image"] += 1
                continue
            self.items.append((image_id, file_name, boxes, labels))
        problems = {k: v for k, v in self.skipped.items() if k in ("missing_image", "degenerate_box")}
        where = (
            f"; no file at {missing[0]}{' and others' if len(missing) > 1 else ''} (file_name is taken "
            f"relative to {self.image_dir})"
            if missing
            else ""
        )
        if problems:
            log.warning("%s: skipped %s%s", ann_file, problems, where)
        log.info(
            "%s: %d images (%d without boxes left out), %d crowd boxes left to COCOeval",
            ann_file,
            len(self.items),
            self.skipped["empty_image"],
            self.skipped["crowd_box"],
        )
        if not self.items:
            raise ValueError(
                f"{ann_file} lists no usable image in {self.image_dir} (skipped: {dict(self.skipped)}){where}"
            )

    def _file_name(self, name: str) -> str | None:
        """``name`` (relative to the image folder, folders allowed; written on Windows with backslashes)
        as a path that exists there, else None."""
        for candidate in dict.fromkeys((name, name.replace("\\", "/"))):
            if (self.image_dir / candidate).is_file():
                return candidate
        return None

    def _targets(self, image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-crowd boxes (xyxy pixels, as annotated: :meth:`read` clips them to the image) and their labels."""
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann["iscrowd"]:
                self.skipped["crowd_box"] += 1
                continue
            x, y, w, h = ann["bbox"]
            if w < 1 or h < 1:
                self.skipped["degenerate_box"] += 1
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self.cat_to_label[ann["category_id"]])
        return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.items)

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The untransformed ``uint8 [3, H, W]`` image, its boxes (xyxy pixels, clipped to the decoded
        image; boxes left under a pixel wide or high are dropped) and their labels. Raises
        :class:`UnreadableFileError` (an OSError) naming the file when it cannot be decoded."""
        image_id, file_name, boxes, labels = self.items[index]
        path = self.image_dir / file_name
        try:
            with open_image(path) as img:
                image = v2.functional.pil_to_tensor(img.convert("RGB"))
        except OSError as err:
            raise UnreadableFileError(path, err, f"replace the file or remove its entry from {self.ann_file}") from err
        height, width = image.shape[-2:]
        info = self.coco.imgs[image_id]
        if (info["width"], info["height"]) != (width, height) and not self._size_logged:
            self._size_logged = True
            log.warning(
                "%s says image %s is %sx%s but %s is %dx%d: boxes are clipped to the image's own size "
                "(logged for the first such image of the file only)",
                self.ann_file,
                image_id,
                info["width"],
                info["height"],
                path,
                width,
                height,
            )
        boxes = torch.stack(
            [
                boxes[:, 0].clamp(0, width),
                boxes[:, 1].clamp(0, height),
                boxes[:, 2].clamp(0, width),
                boxes[:, 3].clamp(0, height),
            ],
            1,
        )
        keep = ((boxes[:, 2:] - boxes[:, :2]) >= 1).all(1)
        return image, boxes[keep], labels[keep]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict] | None:
        try:
            image, boxes, labels = self.read(index)
        except UnreadableFileError as err:
            self.unreadable.skip(err.path, err.reason, err.fix)
            return None
        image_id = self.items[index][0]
        height, width = image.shape[-2:]
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": labels,
        }
        image, target = self.transform(tv_tensors.Image(image), target)
        size = torch.tensor(image.shape[-2:][::-1], dtype=torch.float32).repeat(2)
        return image.as_subclass(torch.Tensor), {
            "boxes": target["boxes"].as_subclass(torch.Tensor) / size,
            "labels": target["labels"],
            "image_id": image_id,
            "orig_size": (int(height), int(width)),
        }


# The fields every entry of an instances file needs (COCO's data format), per list: the entry's
# name in messages, and what a correct entry holds.
_REQUIRED = {
    "images": (
        ("id", "file_name", "width", "height"),
        "image",
        "an image needs a unique id, its file_name relative to the split folder, and its width and height in pixels",
    ),
    "annotations": (
        ("image_id", "bbox", "category_id"),
        "annotation",
        "an annotation needs the image_id of its image, a bbox [x, y, width, height] in pixels "
        "and a category_id listed in categories",
    ),
    "categories": (("id", "name"), "category", "a category needs a unique id and a name"),
}
# Fields COCOeval reads that exports of other tools often leave out, and what stands in for them.
_FILLED = {"area": "the box's area", "iscrowd": "0, not a crowd", "id": "numbered after the largest id"}


def _entry(noun: str, section: str, index: int, entry) -> str:
    """How a message names an entry: ``annotation 7 (entry 3 of annotations)``."""
    has_id = isinstance(entry, dict) and "id" in entry
    return f"{noun} {entry['id'] if has_id else 'without id'} (entry {index} of {section})"


def _check_entries(ann_file: Path, data: dict) -> None:
    """Refuse the first entry of ``data`` lacking a required field, with a duplicate id, a malformed
    image or bbox, or an unlisted category: one error naming the file, the entry and the fix."""

    def refuse(section: str, bad: list[tuple[int, dict, str]], fix: str = "") -> None:
        if bad:
            _, noun, needs = _REQUIRED[section]
            index, entry, problem = bad[0]
            more = f" ({len(bad) - 1} more {section} entries have this problem)" if len(bad) > 1 else ""
            tail = (
                "Fix the entry, or remove it and the annotations of its category"
                if section == "categories"
                else ("Fix or remove the entry")
            )
            raise ValueError(
                f"{ann_file}: {_entry(noun, section, index, entry)} {problem}{more}; {fix or needs}. {tail}."
            )

    for section, (keys, _, _) in _REQUIRED.items():
        if not isinstance(data[section], list):
            raise ValueError(f"{ann_file}: {section} is a {type(data[section]).__name__}, not a list of entries")
        entries = list(enumerate(data[section]))
        refuse(
            section,
            [
                (i, e, f"lacks {', '.join(missing)}")
                for i, e in entries
                if (missing := [k for k in keys if not isinstance(e, dict) or k not in e])
            ],
        )
        ids = Counter(e["id"] for _, e in entries if "id" in e)
        refuse(
            section,
            [
                (i, e, f"shares its id with {ids[e['id']] - 1} other entries")
                for i, e in entries
                if ids[e.get("id")] > 1
            ],
        )
    refuse(
        "images",
        [
            (i, e, f"has file_name {e['file_name']!r}, width {e['width']!r} and height {e['height']!r}")
            for i, e in enumerate(data["images"])
            if not (isinstance(e["file_name"], str) and _is_number(e["width"]) and _is_number(e["height"]))
        ],
    )
    anns = list(enumerate(data["annotations"]))
    refuse("annotations", [(i, a, f"has bbox {a['bbox']!r}") for i, a in anns if not _is_box(a["bbox"])])
    known = sorted(c["id"] for c in data["categories"])
    listed, known_set = f"{known[:20]}{'...' if len(known) > 20 else ''}", set(known)
    refuse(
        "annotations",
        [
            (i, a, f"has category_id {a['category_id']!r}, which categories does not list (its ids: {listed})")
            for i, a in anns
            if a["category_id"] not in known_set
        ],
        "add the category to categories, or correct the annotation's category_id",
    )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_box(bbox) -> bool:
    return isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)


def _fill_optional(ann_file: Path, annotations: list[dict]) -> None:
    """Give every annotation the ``area``, ``iscrowd`` and ``id`` COCOeval reads (see ``_FILLED``);
    one log line per file says how many were filled in."""
    filled: Counter = Counter()
    next_id = max((a["id"] for a in annotations if isinstance(a.get("id"), int)), default=0) + 1
    for ann in annotations:
        for key in _FILLED:
            if key not in ann:
                filled[key] += 1
                ann[key] = {"area": float(ann["bbox"][2] * ann["bbox"][3]), "iscrowd": 0, "id": next_id}[key]
                next_id += key == "id"
    if filled:
        log.warning(
            "%s: %s",
            ann_file,
            "; ".join(
                f"{n} of {len(annotations)} annotations have no {key}, taken as {_FILLED[key]}"
                for key, n in filled.items()
            ),
        )


def _load_coco(ann_file: Path) -> COCO:
    """pycocotools' COCO index of ``ann_file``, checked (see the module doc), with clear errors for a
    missing or malformed file."""
    if not ann_file.is_file():
        raise FileNotFoundError(
            f"annotation file {ann_file} is missing; COCO's layout is "
            f"<root>/annotations/instances_<split>.json (download annotations_trainval2017.zip)"
        )
    try:
        data = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{ann_file} is not valid JSON ({err}); re-download or regenerate it") from err
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(
            f"{ann_file} is not a COCO instances file: no {', '.join(missing)} list; "
            f"use annotations/instances_<split>.json"
        )
    _check_entries(ann_file, data)
    _fill_optional(ann_file, data["annotations"])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detection_collate(batch: list[tuple[torch.Tensor, dict] | None]) -> tuple[torch.Tensor, list[dict], int]:
    """Stack the readable images and keep their targets (varying numbers of boxes) as a list; the
    third element counts the unreadable items (``None``) left out."""
    good = [sample for sample in batch if sample is not None]
    if not good:
        return torch.empty(0, 3, 0, 0), [], len(batch)
    images, targets = zip(*good)
    return torch.stack(images), list(targets), len(batch) - len(good)
