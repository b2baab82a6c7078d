"""The embedded segmentation demo set: real Fashion-MNIST items on textured backgrounds, in the
ADE20K release layout, so that :class:`pyconv_core.data.ade20k.ADE20K` reads it unchanged.

Each image has two background regions (split by a wavy line) of two of four "stuff" classes
(wall: banded, floor: tiled, grass: noisy, sky: a gradient; each in jittered colours of its
own) and a few Fashion-MNIST items (train split for training, test split for validation),
scaled, lightly tinted and pasted with their intensity as opacity. Masks are exact from the
visible pixels: a pixel takes the label of the layer that contributes at least half of its
colour, and is "other" (0, ignored) where no layer does, as on the soft rims of the items.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from pyconv_core.data.fashion_mnist import CLASSES as FASHION_CLASSES, load_fashion_mnist

__all__ = ["DEMO_CLASSES", "DEMO_ROOT", "make_demo_ade20k"]

# Background "stuff" classes (names from ADE20K): two base colours each, and a texture in _texture.
TEXTURES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "wall": ((0.78, 0.72, 0.62), (0.62, 0.55, 0.45)),
    "floor": ((0.50, 0.34, 0.20), (0.30, 0.20, 0.12)),
    "grass": ((0.20, 0.55, 0.15), (0.35, 0.75, 0.25)),
    "sky": ((0.35, 0.55, 0.95), (0.70, 0.85, 1.00)),
}
DEMO_CLASSES: tuple[str, ...] = (*TEXTURES, *(c.lower() for c in FASHION_CLASSES))
DEMO_ROOT = Path(__file__).resolve().parents[2] / "data" / "demo_ade20k"
_VERSION = 2


def _texture(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A ``[H, W, 3]`` float texture in [0, 1] between two jittered colours of the class."""
    a, b = (np.clip(np.array(c) + rng.uniform(-0.12, 0.12, 3), 0, 1) for c in TEXTURES[kind])
    y, x = np.mgrid[:height, :width].astype(np.float32)
    angle = rng.uniform(-0.3, 0.3)
    if kind == "wall":  # horizontal bands
        t = (np.sin(2 * np.pi * (y + x * angle) / rng.uniform(4, 8)) > 0).astype(np.float32)
    elif kind == "floor":  # tiles
        cell = rng.integers(3, 7)
        t = ((x // cell + y // cell) % 2).astype(np.float32)
    elif kind == "grass":  # pixel noise
        t = rng.uniform(0, 1, (height, width)).astype(np.float32)
    else:  # sky: a smooth vertical gradient
        t = y / max(height - 1, 1)
    return a + t[..., None] * (b - a)


def _render(
    items: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    size_range: tuple[int, int],
    items_per_image: tuple[int, int],
    item_scale: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 ``[H, W, 3]``) and its ADE20K-style mask (uint8, 0 = other, classes from 1)."""
    height, width = rng.integers(size_range[0], size_range[1] + 1, 2)
    top, bottom = rng.choice(len(TEXTURES), 2, replace=False)
    kinds = list(TEXTURES)
    x = np.arange(width)
    boundary = height * rng.uniform(0.3, 0.7) + height * 0.1 * np.sin(
        2 * np.pi * x / width * rng.uniform(0.5, 2) + rng.uniform(0, 2 * np.pi)
    )
    lower = np.arange(height)[:, None] >= boundary[None, :]
    image = np.where(
        lower[..., None], _texture(kinds[bottom], height, width, rng), _texture(kinds[top], height, width, rng)
    )
    layer_labels = [np.where(lower, bottom + 1, top + 1)]
    weights = [np.ones((height, width), np.float32)]  # visible share of each layer's colour
    for index in rng.choice(len(items), rng.integers(items_per_image[0], items_per_image[1] + 1), replace=False):
        side = int(round(28 * rng.uniform(*item_scale)))
        glyph = Image.fromarray(items[index]).resize((side, side), Image.Resampling.BILINEAR)
        intensity = np.zeros((height, width), np.float32)  # the item's grey levels, placed
        y0, x0 = rng.integers(-side // 4, height - 3 * side // 4), rng.integers(-side // 4, width - 3 * side // 4)
        ys, xs = slice(max(y0, 0), min(y0 + side, height)), slice(max(x0, 0), min(x0 + side, width))
        window = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
        intensity[ys, xs] = np.asarray(glyph, np.float32)[window] / 255
        alpha = np.clip(2 * intensity, 0, 1)  # opaque from half intensity on; soft rims blend
        color = rng.uniform(0.7, 1, 3) * intensity[..., None]  # the item's own grey levels, lightly tinted
        image = image * (1 - alpha[..., None]) + color * alpha[..., None]
        weights = [w * (1 - alpha) for w in weights] + [alpha]
        layer_labels.append(np.full((height, width), len(TEXTURES) + 1 + labels[index]))
    shares, layer_masks = np.stack(weights), np.stack(layer_labels)
    top_layer = shares.argmax(0)
    mask = np.take_along_axis(layer_masks, top_layer[None], 0)[0]
    mask[np.take_along_axis(shares, top_layer[None], 0)[0] < 0.5] = 0
    return (image * 255).round().clip(0, 255).astype(np.uint8), mask.astype(np.uint8)


def _write_object_info(root: Path, pixels: dict[str, np.ndarray], images: dict[str, np.ndarray]) -> None:
    """``objectInfo150.txt`` as in ADE20K: Idx, pixel Ratio, images with the class in Train / Val, Name."""
    total = sum(p.sum() for p in pixels.values())
    rows = ["Idx\tRatio\tTrain\tVal\tName"]
    for i, name in enumerate(DEMO_CLASSES):
        ratio = (pixels["training"][i + 1] + pixels["validation"][i + 1]) / total
        rows.append(f"{i + 1}\t{ratio:.4f}\t{images['training'][i + 1]}\t{images['validation'][i + 1]}\t{name}")
    (root / "objectInfo150.txt").write_text("\n".join(rows) + "\n")


def make_demo_ade20k(
    root: str | os.PathLike | None = None,
    num_train: int = 400,
    num_val: int = 80,
    size_range: tuple[int, int] = (48, 72),
    items_per_image: tuple[int, int] = (2, 4),
    item_scale: tuple[float, float] = (0.9, 1.4),
    seed: int = 0,
) -> Path:
    """Write the demo set (unless already there with the same parameters); return its
    ``ADEChallengeData2016`` folder.

    ``size_range``: image sides in pixels; ``item_scale``: item size relative to 28 pixels.
    Classes (``DEMO_CLASSES``): 4 textures, then the 10 Fashion-MNIST classes.
    """
    root = Path(root) if root is not None else DEMO_ROOT
    params = {
        "version": _VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "size_range": list(size_range),
        "items_per_image": list(items_per_image),
        "item_scale": list(item_scale),
        "seed": seed,
    }
    out = root / "ADEChallengeData2016"
    stamp = root / "demo.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params and out.is_dir():
        return out
    tmp = root / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    pixels, images = {}, {}
    for part, (split, fashion_split, count, prefix) in enumerate(
        (("training", "train", num_train, "ADE_train"), ("validation", "test", num_val, "ADE_val"))
    ):
        items, labels = load_fashion_mnist(fashion_split)
        rng = np.random.default_rng([seed, part])
        (tmp / "images" / split).mkdir(parents=True)
        (tmp / "annotations" / split).mkdir(parents=True)
        pixels[split] = np.zeros(len(DEMO_CLASSES) + 1, np.int64)
        images[split] = np.zeros(len(DEMO_CLASSES) + 1, np.int64)
        for i in range(count):
            image, mask = _render(items, labels, rng, size_range, items_per_image, item_scale)
            name = f"{prefix}_{i + 1:08d}"
            Image.fromarray(image).save(tmp / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(mask).save(tmp / "annotations" / split / f"{name}.png")
            counts = np.bincount(mask.ravel(), minlength=len(DEMO_CLASSES) + 1)
            pixels[split] += counts
            images[split] += counts > 0
    _write_object_info(tmp, pixels, images)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    stamp.write_text(json.dumps(params))
    return out
