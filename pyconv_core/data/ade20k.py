"""ADE20K scene parsing (Zhou et al. 2017) in its release layout, and PSPNet's training augmentation.

Layout of ``ADEChallengeData2016`` (the SceneParsing benchmark, 150 classes)::

    ADEChallengeData2016/
        objectInfo150.txt                    Idx, Ratio, Train, Val, Name (class names; optional)
        images/{training,validation}/ADE_train_00000001.jpg, ...
        annotations/{training,validation}/ADE_train_00000001.png, ...   8-bit labels

Annotation value 0 ("other") becomes the ignore index 255 and classes 1..150 become 0..149.
The training transform is the recipe's (docs/paper.md s.6): random scale 0.5-2.0, rotation +-10
degrees, horizontal flip, and a random crop of 473 padded with the mean colour (image) and the
ignore label (mask). The embedded demo set (:mod:`pyconv_core.data.demo_segmentation`) is
written in this same layout and read by this same code. An image or mask that cannot be decoded
(e.g. truncated) is logged by path and skipped when it is met, and counted (``num_skipped``,
:mod:`pyconv_core.data.unreadable`). A readable mask that does not fit its image (not 8-bit
single-channel, another size, a label beyond the class list) is an error naming the file:
:meth:`ADE20K.check` finds it before any training (the segmentation task checks both splits, the
validation masks' labels too), not an epoch later when the pair is first read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

from pyconv_core.data.unreadable import UnreadableFileError, UnreadableFiles, open_image

__all__ = [
    "ADE20K",
    "ADE20K_CLASSES",
    "ADE20K_PALETTE",
    "IGNORE_INDEX",
    "MEAN",
    "STD",
    "TrainTransform",
    "normalize",
    "denormalize",
    "colorize",
    "palette_for",
    "read_class_names",
    "to_train_ids",
]

IGNORE_INDEX = 255
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SPLITS = ("training", "validation")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# every image needs its mask: an unreadable one of the pair goes with the other
_FIX_UNREADABLE = "replace the file, or remove the image and its mask"

# The 150 classes of the benchmark (first name of each objectInfo150.txt row) and the usual palette.
ADE20K_CLASSES: tuple[str, ...] = (
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
)
ADE20K_PALETTE = np.array(
    [
        (120, 120, 120),
        (180, 120, 120),
        (6, 230, 230),
        (80, 50, 50),
        (4, 200, 3),
        (120, 120, 80),
        (140, 140, 140),
        (204, 5, 255),
        (230, 230, 230),
        (4, 250, 7),
        (224, 5, 255),
        (235, 255, 7),
        (150, 5, 61),
        (120, 120, 70),
        (8, 255, 51),
        (255, 6, 82),
        (143, 255, 140),
        (204, 255, 4),
        (255, 51, 7),
        (204, 70, 3),
        (0, 102, 200),
        (61, 230, 250),
        (255, 6, 51),
        (11, 102, 255),
        (255, 7, 71),
        (255, 9, 224),
        (9, 7, 230),
        (220, 220, 220),
        (255, 9, 92),
        (112, 9, 255),
        (8, 255, 214),
        (7, 255, 224),
        (255, 184, 6),
        (10, 255, 71),
        (255, 41, 10),
        (7, 255, 255),
        (224, 255, 8),
        (102, 8, 255),
        (255, 61, 6),
        (255, 194, 7),
        (255, 122, 8),
        (0, 255, 20),
        (255, 8, 41),
        (255, 5, 153),
        (6, 51, 255),
        (235, 12, 255),
        (160, 150, 20),
        (0, 163, 255),
        (140, 140, 140),
        (250, 10, 15),
        (20, 255, 0),
        (31, 255, 0),
        (255, 31, 0),
        (255, 224, 0),
        (153, 255, 0),
        (0, 0, 255),
        (255, 71, 0),
        (0, 235, 255),
        (0, 173, 255),
        (31, 0, 255),
        (11, 200, 200),
        (255, 82, 0),
        (0, 255, 245),
        (0, 61, 255),
        (0, 255, 112),
        (0, 255, 133),
        (255, 0, 0),
        (255, 163, 0),
        (255, 102, 0),
        (194, 255, 0),
        (0, 143, 255),
        (51, 255, 0),
        (0, 82, 255),
        (0, 255, 41),
        (0, 255, 173),
        (10, 0, 255),
        (173, 255, 0),
        (0, 255, 153),
        (255, 92, 0),
        (255, 0, 255),
        (255, 0, 245),
        (255, 0, 102),
        (255, 173, 0),
        (255, 0, 20),
        (255, 184, 184),
        (0, 31, 255),
        (0, 255, 61),
        (0, 71, 255),
        (255, 0, 204),
        (0, 255, 194),
        (0, 255, 82),
        (0, 10, 255),
        (0, 112, 255),
        (51, 0, 255),
        (0, 194, 255),
        (0, 122, 255),
        (0, 255, 163),
        (255, 153, 0),
        (0, 255, 10),
        (255, 112, 0),
        (143, 255, 0),
        (82, 0, 255),
        (163, 255, 0),
        (255, 235, 0),
        (8, 184, 170),
        (133, 0, 255),
        (0, 255, 92),
        (184, 0, 255),
        (255, 0, 31),
        (0, 184, 255),
        (0, 214, 255),
        (255, 0, 112),
        (92, 255, 0),
        (0, 224, 255),
        (112, 224, 255),
        (70, 184, 160),
        (163, 0, 255),
        (153, 0, 255),
        (71, 255, 0),
        (255, 0, 163),
        (255, 204, 0),
        (255, 0, 143),
        (0, 255, 235),
        (133, 255, 0),
        (255, 0, 235),
        (245, 0, 255),
        (255, 0, 122),
        (255, 245, 0),
        (10, 190, 212),
        (214, 255, 0),
        (0, 204, 255),
        (20, 0, 255),
        (255, 255, 0),
        (0, 153, 255),
        (0, 41, 255),
        (0, 255, 204),
        (41, 0, 255),
        (41, 255, 0),
        (173, 0, 255),
        (0, 245, 255),
        (71, 0, 255),
        (122, 0, 255),
        (0, 255, 184),
        (0, 92, 255),
        (184, 255, 0),
        (0, 133, 255),
        (255, 214, 0),
        (25, 194, 194),
        (102, 255, 0),
        (92, 0, 255),
    ],
    dtype=np.uint8,
)


def read_class_names(root: str | os.PathLike) -> tuple[str, ...]:
    """Class names from ``root/objectInfo150.txt`` (first synonym of each row), else ADE20K's 150."""
    info = Path(root) / "objectInfo150.txt"
    if not info.is_file():
        return ADE20K_CLASSES
    rows = [
        line.split("\t") if "\t" in line else line.split(None, 4)
        for line in info.read_text().splitlines()[1:]
        if line.strip()
    ]
    if any(len(row) < 5 or not row[0].strip().isdigit() for row in rows):
        raise ValueError(
            f"{info} is not in the ADE20K format (columns Idx, Ratio, Train, Val, Name): fix or "
            f"remove it (without it the 150 ADE20K names are used)"
        )
    return tuple(row[4].split(",")[0].strip() for row in sorted(rows, key=lambda r: int(r[0])))


def to_train_ids(label: np.ndarray) -> np.ndarray:
    """ADE20K annotation values to training ids: 0 (other) -> 255 (ignored), k -> k - 1."""
    return np.where(label == 0, IGNORE_INDEX, label.astype(np.int64) - 1).astype(np.uint8)


def _check_mask_header(image_path: Path, image_size: tuple[int, int], mask_path: Path, mask: Image.Image) -> None:
    """Refuse a mask that is not 8-bit single-channel or not of its image's ``(width, height)``; only the
    files' headers are needed."""
    if mask.mode not in ("L", "P"):
        raise ValueError(
            f"{mask_path} is a {mask.mode} image; ADE20K annotations are 8-bit single-channel "
            f"PNGs of class indices (0 = other), not colour masks"
        )
    if mask.size != image_size:
        raise ValueError(
            f"{image_path} is {image_size[0]}x{image_size[1]} but its mask {mask_path} is "
            f"{mask.size[0]}x{mask.size[1]}: image and mask must have the same size"
        )


def _mask_labels(mask_path: Path, mask: Image.Image, num_classes: int) -> np.ndarray:
    """The decoded annotation values, refusing one beyond ``num_classes`` (1..num_classes, 0 = other)."""
    label = np.asarray(mask)
    if label.max() > num_classes:
        raise ValueError(
            f"{mask_path} holds label {label.max()} but the data set has {num_classes} "
            f"classes (1..{num_classes}, 0 = other; objectInfo150.txt lists them, else ADE20K's 150): "
            f"correct the mask, or list its classes in objectInfo150.txt"
        )
    return label


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 ``[3, H, W]`` to float, normalized with the ImageNet mean and std."""
    return TF.normalize(image.float() / 255, MEAN, STD)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """A normalized ``[3, H, W]`` image back to uint8 ``[H, W, 3]`` for display."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (image.detach().cpu().float() * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()


def palette_for(class_names: Sequence[str]) -> np.ndarray:
    """``[C, 3]`` colours: each class takes the ADE20K colour of the ADE20K class of the same
    name; each other class the unused ADE20K colour farthest from those already taken (so
    ADE20K itself gets its own palette, and other label sets distinct colours)."""
    index = {name: i for i, name in enumerate(ADE20K_CLASSES)}
    chosen = {name: index[name] for name in class_names if name in index}
    free = [i for i in range(len(ADE20K_CLASSES)) if i not in set(chosen.values())]
    colours = ADE20K_PALETTE.astype(np.int64)
    for name in class_names:
        if name not in chosen:
            taken = colours[list(chosen.values())]
            gaps = [((colours[i] - taken) ** 2).sum(1).min() if len(taken) else 0 for i in free]
            chosen[name] = free.pop(int(np.argmax(gaps)))
    return ADE20K_PALETTE[[chosen[name] for name in class_names]]


def colorize(mask: torch.Tensor | np.ndarray, palette: np.ndarray = ADE20K_PALETTE) -> np.ndarray:
    """Training-id mask ``[H, W]`` to an RGB image with the ADE20K palette; ignored pixels black."""
    mask = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask).astype(np.int64)
    colors = np.concatenate([palette, np.zeros((256 - len(palette), 3), np.uint8)])
    return colors[np.clip(mask, 0, 255)]


class ADE20K(Dataset):
    """One split of ``ADEChallengeData2016``: ``(image, mask)`` pairs.

    Without ``transform`` an item is the normalized float image ``[3, H, W]`` and the int64 mask
    ``[H, W]`` (training ids, 255 ignored) at full size, as evaluation wants them; ``transform``
    receives the uint8 image and uint8 mask (e.g. :class:`TrainTransform`). An item whose image or
    mask cannot be decoded is ``None`` (the task's collate drops and counts it).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "training",
        transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        limit: int | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        root = Path(root)
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        image_dir, mask_dir = root / "images" / split, root / "annotations" / split
        if not image_dir.is_dir():
            raise FileNotFoundError(
                f"{image_dir} does not exist: point root at ADEChallengeData2016 (from "
                f"http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip) "
                f"holding images/{split}/ and annotations/{split}/"
            )
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)[:limit]
        if not images:
            raise FileNotFoundError(f"{image_dir} holds no .jpg/.png images")
        masks = [mask_dir / f"{p.stem}.png" for p in images]
        missing = [(image, mask) for image, mask in zip(images, masks) if not mask.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(images)} images have no annotation mask, e.g. "
                f"{missing[0][1]} for {missing[0][0]}: every image needs a PNG of the same "
                f"name in {mask_dir} (re-extract the data set, or remove the image)"
            )
        self.root, self.split, self.transform, self.unreadable = root, split, transform, UnreadableFiles()
        self.samples = list(zip(images, masks))
        self.classes = read_class_names(root)
        self.palette = palette_for(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw pair: uint8 image ``[3, H, W]`` and uint8 training-id mask ``[H, W]``. Raises
        :class:`UnreadableFileError` (an OSError) naming the file that cannot be decoded."""
        image_path, mask_path = self.samples[index]
        path = image_path
        try:
            with open_image(image_path) as img:
                image = np.asarray(img.convert("RGB"))
            path = mask_path
            with open_image(mask_path) as m:
                _check_mask_header(image_path, (image.shape[1], image.shape[0]), mask_path, m)
                label = _mask_labels(mask_path, m, len(self.classes))
        except OSError as err:
            raise UnreadableFileError(path, err, _FIX_UNREADABLE) from err
        return torch.from_numpy(image.copy()).permute(2, 0, 1), torch.from_numpy(to_train_ids(label))

    def check(self, labels: bool = True) -> None:
        """Refuse, before any training, a pair that :meth:`read` would refuse when it meets it: one
        ValueError naming the first mask that is not 8-bit single-channel or not of its image's size, or
        (with ``labels``) holds a label beyond the class list, with how many more there are.

        Sizes and modes come from the files' headers; ``labels`` decodes the masks (about 1 ms a mask
        of ADE20K: the segmentation task does it for the validation set, whose pairs are first read
        after an epoch of training). A file that cannot be decoded is no error: it is logged here and
        skipped and counted when met, as in training (:mod:`pyconv_core.data.unreadable`)."""
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # file reads and PNG decoding release the GIL
            problems = [p for p in pool.map(partial(self._problem, labels=labels), range(len(self))) if p]
        if problems:
            more = f" ({len(problems) - 1} more masks of {self.split} fail this check)" if len(problems) > 1 else ""
            raise ValueError(f"{problems[0]}{more}; fix or remove the pair before training")

    def _problem(self, index: int, labels: bool) -> str | None:
        """What :meth:`check` finds wrong with pair ``index`` (None: nothing, or a file it cannot decode)."""
        image_path, mask_path = self.samples[index]
        path = image_path
        try:
            with open_image(image_path) as img:
                size = img.size
            path = mask_path
            with open_image(mask_path) as m:
                _check_mask_header(image_path, size, mask_path, m)
                if labels:
                    _mask_labels(mask_path, m, len(self.classes))
        except OSError as err:
            self.unreadable.skip(path, err, _FIX_UNREADABLE)
        except ValueError as err:
            return str(err)
        return None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            image, mask = self.read(index)
        except UnreadableFileError as err:
            self.unreadable.skip(err.path, err.reason, err.fix)
            return None
        if self.transform is not None:
            return self.transform(image, mask)
        return normalize(image), mask.long()


class TrainTransform:
    """PSPNet's training augmentation (docs/paper.md s.6) on a uint8 image and mask.

    Random scale in ``scale``, rotation in ``rotate`` degrees, horizontal flip, then a random
    ``crop_size`` crop; borders created by rotation or padding are the mean colour (0 after
    normalization) in the image and ``ignore_index`` in the mask.
    """

    def __init__(
        self,
        crop_size: int = 473,
        scale: Sequence[float] = (0.5, 2.0),
        rotate: Sequence[float] = (-10, 10),
        flip: bool = True,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.crop_size, self.scale, self.rotate = crop_size, tuple(scale), tuple(rotate)
        self.flip, self.ignore_index = flip, ignore_index

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return float(torch.empty(()).uniform_(low, high))

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = normalize(image), mask[None]
        s = self._uniform(*self.scale)
        size = [max(1, round(image.shape[-2] * s)), max(1, round(image.shape[-1] * s))]
        image = TF.resize(image, size, InterpolationMode.BILINEAR, antialias=False)
        mask = TF.resize(mask, size, InterpolationMode.NEAREST)
        angle = self._uniform(*self.rotate)
        if angle:
            image = TF.rotate(image, angle, InterpolationMode.BILINEAR, fill=0.0)
            mask = TF.rotate(mask, angle, InterpolationMode.NEAREST, fill=self.ignore_index)
        if self.flip and torch.rand(()) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        pad_h, pad_w = max(self.crop_size - size[0], 0), max(self.crop_size - size[1], 0)
        if pad_h or pad_w:
            pad = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
            image = F.pad(image, pad, value=0.0)
            mask = F.pad(mask, pad, value=self.ignore_index)
        top = int(torch.randint(image.shape[-2] - self.crop_size + 1, ()))
        left = int(torch.randint(image.shape[-1] - self.crop_size + 1, ()))
        window = (..., slice(top, top + self.crop_size), slice(left, left + self.crop_size))
        return image[window].contiguous(), mask[0][window].long()
