"""The embedded detection set: real Fashion-MNIST items pasted onto textured backgrounds, in COCO layout.

Each image gets a few items at several scales, each tinted with a random colour and pasted
over a random texture (smooth noise plus stripes). Items pasted later occlude earlier ones, so
every box is computed from the item's *visible* pixels. An item left with less than
``min_visible`` of its pixels becomes a crowd annotation (``iscrowd=1``), which COCOeval
ignores and training skips; a fully hidden item is dropped. Training images use items of the
Fashion-MNIST train split, validation images items of the test split.

The folder ``<root>/{train2017,val2017}/*.jpg`` + ``annotations/instances_*.json`` is the real
COCO layout, read by :class:`pyconv_core.data.coco.CocoDetection` like COCO itself.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pyconv_core.data.fashion_mnist import CLASSES, load_fashion_mnist

__all__ = ["DemoDetectionConfig", "make_demo_coco", "DEMO_CATEGORY_IDS"]

# Non-contiguous ids, like COCO's (1..90 with gaps), so the label mapping is exercised for real.
DEMO_CATEGORY_IDS = (1, 2, 3, 5, 7, 8, 11, 13, 17, 19)
_VISIBLE = 0.25  # an item pixel counts as visible where its alpha exceeds this


@dataclass(frozen=True)
class DemoDetectionConfig:
    """What the generated set looks like; a folder is reused only if generated with the same values."""

    num_train: int = 256
    num_val: int = 64
    image_size: int = 64  # side of the square images, px
    max_objects: int = 3  # items per image: 1..max_objects (plus a few empty images)
    min_scale: float = 0.3  # item side as a fraction of the image side (SSD's boxes on 64 px: 0.39..0.87)
    max_scale: float = 0.8
    empty_fraction: float = 0.03  # images without any item
    min_visible: float = 0.5  # visible share below which an item is a crowd (ignored) annotation
    seed: int = 0


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random RGB background: smooth colour noise plus oriented stripes, float in [0, 1]."""
    cells = rng.integers(3, 9)
    coarse = rng.random((cells, cells, 3)).astype(np.float32)
    noise = (
        np.asarray(
            Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC),
            dtype=np.float32,
        )
        / 255
    )
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 24)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    base = rng.random(3).astype(np.float32)
    mix = rng.uniform(0.2, 0.5)
    return np.clip((1 - mix) * (0.5 * base + 0.5 * noise) + mix * stripes[..., None] * rng.random(3), 0, 1)


def _item(rng: np.random.Generator, image: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """A Fashion-MNIST item resized to ``side``: colour layer and alpha, both float."""
    grey = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    tint = rng.uniform(0.3, 1.0, size=3).astype(np.float32)
    alpha = np.clip(grey * 2.0, 0, 1)
    return (0.25 + 0.75 * grey)[..., None] * tint, alpha


def _render(
    rng: np.random.Generator, items: np.ndarray, labels: np.ndarray, cfg: DemoDetectionConfig
) -> tuple[np.ndarray, list[dict]]:
    """One image and its annotations (category index, visible mask, full pixel count)."""
    size = cfg.image_size
    canvas = _texture(rng, size)
    n = 0 if rng.random() < cfg.empty_fraction else int(rng.integers(1, cfg.max_objects + 1))
    placed: list[dict[str, Any]] = []
    for _ in range(n):
        idx = int(rng.integers(len(items)))
        side = int(round(size * rng.uniform(cfg.min_scale, cfg.max_scale)))
        colour, alpha = _item(rng, items[idx], side)
        top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        window = (slice(top, top + side), slice(left, left + side))
        canvas[window] = canvas[window] * (1 - alpha[..., None]) + colour * alpha[..., None]
        mask = np.zeros((size, size), dtype=bool)
        mask[window] = alpha > _VISIBLE
        if not mask.any():
            continue
        for earlier in placed:
            earlier["visible"] &= ~mask
        placed.append({"category": int(labels[idx]), "visible": mask, "full": int(mask.sum())})
    return (canvas * 255).round().astype(np.uint8), placed


def _annotation(ann_id: int, image_id: int, item: dict, cfg: DemoDetectionConfig) -> dict | None:
    visible = item["visible"]
    area = int(visible.sum())
    if area == 0:
        return None
    ys, xs = np.nonzero(visible)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": DEMO_CATEGORY_IDS[item["category"]],
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "area": area,
        "segmentation": rle,
        "iscrowd": int(area < cfg.min_visible * item["full"]),
    }


def _write_split(root: Path, split: str, source: str, count: int, cfg: DemoDetectionConfig, seed: int) -> None:
    items, labels = load_fashion_mnist(source)
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id in range(1, count + 1):
        pixels, placed = _render(rng, items, labels, cfg)
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(pixels).save(root / split / file_name, quality=92)
        images.append({"id": image_id, "file_name": file_name, "width": cfg.image_size, "height": cfg.image_size})
        for item in placed:
            ann = _annotation(len(annotations) + 1, image_id, item, cfg)
            if ann is not None:
                annotations.append(ann)
    categories = [
        {"id": cid, "name": name, "supercategory": "clothing"} for cid, name in zip(DEMO_CATEGORY_IDS, CLASSES)
    ]
    data = {
        "info": {"description": "PyConv workbook demo detection set (Fashion-MNIST items)", "config": asdict(cfg)},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def make_demo_coco(root: str | Path = "data/demo_coco", config: DemoDetectionConfig | None = None) -> Path:
    """Generate the demo set under ``root`` (COCO layout) unless it is already there with the same
    config; returns ``root``. Written to a temporary sibling folder, then renamed into place."""
    cfg = config or DemoDetectionConfig()
    root = Path(root)
    stamp = root / "config.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == asdict(cfg):
        return root
    tmp = root.with_name(f".{root.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_split(tmp, "train2017", "train", cfg.num_train, cfg, cfg.seed)
    _write_split(tmp, "val2017", "test", cfg.num_val, cfg, cfg.seed + 1)
    (tmp / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root
