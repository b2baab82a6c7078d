"""The embedded video set: real Fashion-MNIST items whose *motion* is the label, as mp4 in Kinetics layout.

Each video shows one tinted Fashion-MNIST item on a dark background doing one of nine motions:
moving right / left / up / down, bouncing (hopping on the spot), rotating clockwise /
anticlockwise, zooming in / out. Position, angle and size are drawn from the same ranges for every
class, so a single frame does not tell the class: the label takes time to read, which is what 3D
kernels are for. Training videos use items of the Fashion-MNIST train split, validation videos
items of the test split.

The folder is the real Kinetics layout read by :class:`pyconv_core.data.kinetics.KineticsDataset`:
``annotations/{train,val}.csv`` (``label,youtube_id,time_start,time_end,split``) and H.264 files
``{train,val}/<label>/<youtube_id>_<start:06d>_<end:06d>.mp4`` written with PyAV.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from pyconv_core.data.fashion_mnist import load_fashion_mnist
from pyconv_core.data.kinetics import ANNOTATION_COLUMNS

__all__ = ["DemoVideoConfig", "MOTIONS", "make_demo_kinetics", "render_video", "write_mp4"]

MOTIONS = (
    "moving right",
    "moving left",
    "moving up",
    "moving down",
    "bouncing",
    "rotating clockwise",
    "rotating anticlockwise",
    "zooming in",
    "zooming out",
)
_DIRECTIONS = {"moving right": (1, 0), "moving left": (-1, 0), "moving up": (0, -1), "moving down": (0, 1)}


@dataclass(frozen=True)
class DemoVideoConfig:
    """What the generated set looks like; a folder is reused only if generated with the same values."""

    train_per_class: int = 32
    val_per_class: int = 8
    frames: int = 24  # frames per video
    fps: int = 12
    size: int = 64  # side of the square frames, px
    item_scale: tuple[float, float] = (0.5, 1.0)  # item side / (0.45 * size), for every class
    speed: tuple[float, float] = (1.2, 1.8)  # translation, px per frame at size 64
    spin: tuple[float, float] = (6.0, 10.0)  # rotation, degrees per frame (below 45 per sampled frame at stride 4)
    zoom: float = 1.8  # size ratio between the last and the first frame of a zoom
    hop_period: tuple[int, int] = (10, 16)  # frames per bounce (several samples per hop at stride 4)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 < self.zoom < self.item_scale[1] / self.item_scale[0]:
            raise ValueError(
                f"zoom {self.zoom} must lie between 1 and the item_scale range ratio "
                f"{self.item_scale[1] / self.item_scale[0]:.2f}, so zooms stay within item_scale"
            )


def _path(rng: np.random.Generator, motion: str, cfg: DemoVideoConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame: item center (x, y) in px, angle in degrees (counter-clockwise), item side in px."""
    t = np.arange(cfg.frames, dtype=np.float64) - (cfg.frames - 1) / 2
    unit = 0.45 * cfg.size
    angle = np.full_like(t, rng.uniform(-180, 180))
    if motion.startswith("zooming"):
        sign = 1 if motion == "zooming in" else -1
        low, high = cfg.item_scale
        middle = rng.uniform(low * math.sqrt(cfg.zoom), high / math.sqrt(cfg.zoom))
        side = unit * middle * cfg.zoom ** (sign * t / (cfg.frames - 1))
    else:
        side = np.full_like(t, unit * rng.uniform(*cfg.item_scale))
    if motion.startswith("rotating"):
        sign = -1 if motion == "rotating clockwise" else 1
        angle = angle + sign * rng.uniform(*cfg.spin) * t
    half = side.max() * 0.5
    center = rng.uniform(half, cfg.size - half, size=2)
    x, y = np.full_like(t, center[0]), np.full_like(t, center[1])
    if motion in _DIRECTIONS:
        step = rng.uniform(*cfg.speed) * cfg.size / 64
        travel = step * (cfg.frames - 1) / 2
        dx, dy = _DIRECTIONS[motion]
        lo, hi = half + travel, cfg.size - half - travel
        middle = rng.uniform(lo, hi) if hi > lo else cfg.size / 2
        x = x if dx == 0 else middle + dx * step * t
        y = y if dy == 0 else middle + dy * step * t
    elif motion == "bouncing":
        period = rng.integers(cfg.hop_period[0], cfg.hop_period[1] + 1)
        height = rng.uniform(0.15, 0.25) * cfg.size
        floor = rng.uniform(half + height, cfg.size - half)
        y = floor - height * np.abs(np.sin(np.pi * t / period + rng.uniform(0, np.pi)))
    return np.stack([x, y], 1), angle, side


def render_video(rng: np.random.Generator, item: np.ndarray, motion: str, cfg: DemoVideoConfig) -> np.ndarray:
    """The frames ``uint8 [T, size, size, 3]`` of one item (28x28 grey) doing ``motion``."""
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; choose one of {MOTIONS}")
    centers, angles, sides = _path(rng, motion, cfg)
    background = rng.uniform(0.0, 0.25, size=3)
    tint = rng.uniform(0.5, 1.0, size=3)
    grey = Image.fromarray(item)
    frames = np.empty((cfg.frames, cfg.size, cfg.size, 3), dtype=np.uint8)
    for i, ((cx, cy), angle, side) in enumerate(zip(centers, angles, sides)):
        s = max(2, int(round(side)))
        sprite = grey.resize((s, s), Image.Resampling.BILINEAR).rotate(angle, Image.Resampling.BILINEAR, expand=True)
        layer = Image.new("L", (cfg.size, cfg.size))
        layer.paste(sprite, (int(round(cx - sprite.width / 2)), int(round(cy - sprite.height / 2))))
        alpha = np.asarray(layer, dtype=np.float64)[..., None] / 255
        frame = background * (1 - alpha) + tint * alpha
        frames[i] = np.round(frame * 255).astype(np.uint8)
    return frames


def write_mp4(path: str | Path, frames: np.ndarray, fps: int) -> None:
    """Encode ``uint8 [T, H, W, 3]`` frames as an H.264 mp4 with PyAV (index first, as web videos)."""
    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "18", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def make_demo_kinetics(root: str | Path = "data/demo_kinetics", cfg: DemoVideoConfig = DemoVideoConfig()) -> Path:
    """Generate the set under ``root`` (git-ignored ``data/``), or reuse it if ``root/config.json``
    records the same ``cfg``; returns ``root``."""
    root = Path(root)
    stamp = root / "config.json"
    wanted = json.loads(json.dumps(asdict(cfg)))
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return root
    for part in ("train", "val", "annotations"):
        shutil.rmtree(root / part, ignore_errors=True)
    (root / "annotations").mkdir(parents=True)
    seconds = math.ceil(cfg.frames / cfg.fps)
    for split, source, per_class, offset in (
        ("train", "train", cfg.train_per_class, 0),
        ("val", "test", cfg.val_per_class, 1),
    ):
        items, _ = load_fashion_mnist(source)
        rng = np.random.default_rng([cfg.seed, offset])
        rows = []
        for n in range(per_class * len(MOTIONS)):
            motion = MOTIONS[n % len(MOTIONS)]
            youtube_id = f"demo{split[0]}{n:06d}"
            folder = root / split / motion
            folder.mkdir(parents=True, exist_ok=True)
            frames = render_video(rng, items[rng.integers(len(items))], motion, cfg)
            write_mp4(folder / f"{youtube_id}_{0:06d}_{seconds:06d}.mp4", frames, cfg.fps)
            rows.append((motion, youtube_id, 0, seconds, split))
        with open(root / "annotations" / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(ANNOTATION_COLUMNS)
            writer.writerows(rows)
    stamp.write_text(json.dumps(wanted, indent=1))
    return root
