"""COCO detection (Lin et al. 2014) in its real layout, with SSD's augmentation.

    <root>/train2017/*.jpg   <root>/val2017/*.jpg   <root>/annotations/instances_{train,val}2017.json

Annotations are read with pycocotools. Category ids (1..90 with gaps for COCO) map to contiguous
labels 1..K; 0 is the background. Crowd boxes are left out of the training targets (COCOeval
treats them as ignore regions on its own); degenerate boxes and images whose file is missing
are skipped with a logged count; images without annotations are kept (unless ``skip_empty``)
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
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms import v2

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
            inside = ((left[:, None] < cx) & (cx < right[:, None]) & (top[:, None] < cy) & (cy < bottom[:, None]))
            ious = box_iou(torch.stack([left, top, right, bottom], 1).to(xyxy.dtype), xyxy).masked_fill(~inside, -1.0)
            ok = ((new_w > 0) & (new_h > 0) & (aspect >= self.min_aspect_ratio) & (aspect <= self.max_aspect_ratio)
                  & inside.any(1) & (ious.max(1).values >= min_iou)).nonzero()
            if len(ok):
                i = int(ok[0])
                return dict(top=int(top[i]), left=int(left[i]), height=int(new_h[i]), width=int(new_w[i]),
                            is_within_crop_area=inside[i])


def ssd_transform(train: bool, size: int = 300, max_expand: float = 4.0) -> v2.Compose:
    """SSD's augmentation for training (Liu et al. 2016, s.2.2 and 3.6: colour jitter, zoom-out
    expansion up to ``max_expand`` x (1: none), random min-IoU crop, horizontal flip), then resize
    to ``size`` x ``size`` and ImageNet normalization; for validation only the resize and normalization."""
    fill = tuple(round(255 * m) for m in IMAGENET_MEAN)
    expand = [v2.RandomZoomOut(fill=fill, side_range=(1.0, max_expand), p=0.5)] if max_expand > 1 else []
    augment = [v2.RandomPhotometricDistort(p=0.5), *expand, SSDRandomCrop(), v2.RandomHorizontalFlip()] if train else []
    return v2.Compose([*augment, v2.Resize((size, size), antialias=True), v2.SanitizeBoundingBoxes(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class CocoDetection(Dataset):
    """One split of a COCO-layout folder; items are ``(image, target)``.

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

    def __init__(self, root: str | os.PathLike, split: str = "val2017", train: bool = False, size: int = 300,
                 skip_empty: bool = False, max_expand: float = 4.0) -> None:
        self.root, self.split = Path(root), split
        self.image_dir = self.root / split
        ann_file = self.root / "annotations" / f"instances_{split}.json"
        self.coco = _load_coco(ann_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder {self.image_dir} is missing; the COCO layout is "
                                    f"<root>/{split}/*.jpg next to <root>/annotations/instances_{split}.json")
        cat_ids = sorted(self.coco.getCatIds())
        self.cat_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.label_to_cat = {i: c for c, i in self.cat_to_label.items()}
        self.class_names = ("background", *(self.coco.cats[c]["name"] for c in cat_ids))
        self.transform = ssd_transform(train, size, max_expand)
        present = set(os.listdir(self.image_dir))
        self.skipped: Counter = Counter()
        self.items: list[tuple[int, str, torch.Tensor, torch.Tensor]] = []
        for image_id in sorted(self.coco.getImgIds()):
            info = self.coco.imgs[image_id]
            if info["file_name"] not in present:
                self.skipped["missing_image"] += 1
                continue
            boxes, labels = self._targets(image_id, info)
            if skip_empty and not len(labels):
                self.skipped["empty_image"] += 1
                continue
            self.items.append((image_id, info["file_name"], boxes, labels))
        problems = {k: v for k, v in self.skipped.items() if k in ("missing_image", "degenerate_box")}
        if problems:
            log.warning("%s: skipped %s", ann_file, problems)
        log.info("%s: %d images (%d without boxes left out), %d crowd boxes left to COCOeval", ann_file,
                 len(self.items), self.skipped["empty_image"], self.skipped["crowd_box"])
        if not self.items:
            raise ValueError(f"{ann_file} lists no usable image in {self.image_dir} (skipped: {dict(self.skipped)})")

    def _targets(self, image_id: int, info: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-crowd boxes (xyxy pixels, clipped to the image) and their labels."""
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                self.skipped["crowd_box"] += 1
                continue
            x, y, w, h = ann["bbox"]
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + w, info["width"]), min(y + h, info["height"])
            if x1 - x0 < 1 or y1 - y0 < 1 or ann["category_id"] not in self.cat_to_label:
                self.skipped["degenerate_box"] += 1
                continue
            boxes.append([x0, y0, x1, y1])
            labels.append(self.cat_to_label[ann["category_id"]])
        return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.items)

    def read_image(self, index: int) -> torch.Tensor:
        """The untransformed ``uint8 [3, H, W]`` image (for drawing)."""
        path = self.image_dir / self.items[index][1]
        try:
            with Image.open(path) as image:
                return v2.functional.pil_to_tensor(image.convert("RGB"))
        except (OSError, UnidentifiedImageError) as err:
            raise OSError(f"cannot decode image {path} ({err}); replace the file or remove its entry "
                          f"from the annotation json") from err

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image_id, _, boxes, labels = self.items[index]
        image = self.read_image(index)
        height, width = image.shape[-2:]
        target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
                  "labels": labels}
        image, target = self.transform(tv_tensors.Image(image), target)
        size = torch.tensor(image.shape[-2:][::-1], dtype=torch.float32).repeat(2)
        return image.as_subclass(torch.Tensor), {
            "boxes": target["boxes"].as_subclass(torch.Tensor) / size, "labels": target["labels"],
            "image_id": image_id, "orig_size": (int(height), int(width))}


def _load_coco(ann_file: Path) -> COCO:
    """pycocotools' COCO index of ``ann_file``, with clear errors for a missing or malformed file."""
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file {ann_file} is missing; COCO's layout is "
                                f"<root>/annotations/instances_<split>.json (download annotations_trainval2017.zip)")
    try:
        data = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{ann_file} is not valid JSON ({err}); re-download or regenerate it") from err
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{ann_file} is not a COCO instances file: no {', '.join(missing)} list; "
                         f"use annotations/instances_<split>.json")
    for ann in data["annotations"]:
        bbox = ann.get("bbox")
        if not ("image_id" in ann and "category_id" in ann and isinstance(bbox, list) and len(bbox) == 4):
            raise ValueError(f"{ann_file}: annotation {ann.get('id', '?')} needs image_id, category_id and a bbox "
                             f"[x, y, w, h]; got keys {sorted(ann)}. Fix or remove it.")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detection_collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """Stack the images; keep the per-image targets (varying numbers of boxes) as a list."""
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)
