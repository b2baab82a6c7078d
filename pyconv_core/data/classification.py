"""Classification data: the ImageNet folder layout, its transforms, and Fashion-MNIST as default.

ImageNet: ``<data_dir>/train/<wnid>/*.JPEG`` and ``<data_dir>/val/<wnid>/*.JPEG``. The training
folders define the label space: the validation set takes the training set's class list and
indices, so a class folder missing from ``val/`` only leaves that class out (a warning names it),
and a ``val/`` folder unknown to training is an error before any training. A corrupt or
unreadable image never stops an epoch: it is logged by path, skipped, and counted
(``num_skipped`` in the run's metrics; :mod:`pyconv_core.data.unreadable`).

Training images are decoded and augmented in the DataLoader's CPU workers, or, where those cannot feed a GPU
(BENCHMARKS.md: about 290 ImageNet images/s per core), on the training device: :class:`EncodedImageFolder`
only reads the files and :class:`DeviceAugment` decodes them there (``torchvision.io.decode_jpeg``) and
applies the same RandomResizedCrop and flip.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import UnidentifiedImageError
from torch.utils.data import Dataset, default_collate
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

from pyconv_core.data.fashion_mnist import CLASSES as FASHION_CLASSES, load_fashion_mnist
from pyconv_core.data.unreadable import UnreadableFiles, open_image

__all__ = [
    "ImageFolder",
    "EncodedImageFolder",
    "EncodedBatch",
    "DeviceAugment",
    "FashionMNIST",
    "imagenet_datasets",
    "train_transform",
    "eval_transform",
    "collate_skipping_bad",
    "collate_encoded",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

log = logging.getLogger(__name__)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_MEAN, _STD = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


def train_transform(crop: int = 224) -> Callable:
    """RandomResizedCrop + horizontal flip (the standard ImageNet recipe)."""
    return T.Compose(
        [T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def eval_transform(crop: int = 224) -> Callable:
    """Resize to crop/0.875 (256 for 224, 366 for 320) then center crop."""
    return T.Compose(
        [T.Resize(round(crop / 0.875)), T.CenterCrop(crop), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


class ImageFolder(Dataset):
    """``root/<class>/<image>``; bad files yield ``None``.

    Without ``classes`` the label space is the sorted folder names (hidden folders such as
    ``.ipynb_checkpoints`` left out). With ``classes`` (a validation or test set given the training
    set's ``classes``) labels are indices into that list: a listed class without a folder is a
    warning naming it, a folder that is not listed an error naming it."""

    def __init__(
        self, root: str | os.PathLike, transform: Callable | None = None, classes: Sequence[str] | None = None
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} does not exist; expected the ImageNet layout "
                f"<data_dir>/train/<wnid>/*.JPEG and <data_dir>/val/<wnid>/*.JPEG"
            )
        folders = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        self.classes = list(classes) if classes is not None else folders
        unknown = sorted(set(folders) - set(self.classes))
        if unknown:
            raise ValueError(
                f"{self.root} has class folder(s) {', '.join(unknown[:5])}"
                f"{f' and {len(unknown) - 5} more' if len(unknown) > 5 else ''} (e.g. "
                f"{self.root / unknown[0]}) that the training set does not have: the labels are the "
                f"training folders' ({len(self.classes)} classes); remove the folder or add its class "
                f"to train/"
            )
        absent = [c for c in self.classes if c not in set(folders)]
        if absent:
            log.warning(
                "%s has no folder for %d of the %d training classes (%s%s): they are left out of its "
                "metrics; the other classes keep their training labels",
                self.root,
                len(absent),
                len(self.classes),
                ", ".join(absent[:10]),
                " ..." if len(absent) > 10 else "",
            )
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples = [
            (p, index[c])
            for c in folders
            for p in sorted((self.root / c).iterdir())
            if p.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise FileNotFoundError(
                f"no images found under {self.root}: expected one folder per class holding "
                f"image files ({', '.join(sorted(IMAGE_EXTENSIONS))}), e.g. "
                f"{self.root}/n01440764/n01440764_10026.JPEG"
            )
        self.transform, self.unreadable = transform, UnreadableFiles()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            with open_image(path) as img:
                image = img.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as err:
            self.unreadable.skip(path, err)
            return None
        return (self.transform(image) if self.transform else image), label


def collate_skipping_bad(samples: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Batch the readable samples; the third element counts the skipped ones."""
    good = [s for s in samples if s is not None]
    skipped = len(samples) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, labels = default_collate(good)
    return images, labels, skipped


class EncodedImageFolder(ImageFolder):
    """An :class:`ImageFolder` whose items are ``(bytes, label, path)``: the file's encoded bytes as a uint8
    tensor, for :class:`DeviceAugment` to decode on the training device (a file that cannot be read: None)."""

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            return read_file(str(path)), label, str(path)
        except (OSError, RuntimeError) as err:
            self.unreadable.skip(path, err)
            return None


@dataclass
class EncodedBatch:
    """A batch of encoded images (uint8 tensors of their files' bytes) and their paths."""

    data: list[torch.Tensor]
    paths: list[str]

    def __len__(self) -> int:
        return len(self.data)


def collate_encoded(samples: list) -> tuple[EncodedBatch | torch.Tensor, torch.Tensor, int]:
    """Batch :class:`EncodedImageFolder` items as :func:`collate_skipping_bad` does decoded ones, which it
    leaves to that function (a validation set's: the Trainer gives both loaders the task's collate)."""
    good = [s for s in samples if s is not None]
    if not good or len(good[0]) == 2:
        return collate_skipping_bad(samples)
    labels = torch.tensor([label for _, label, _ in good], dtype=torch.long)
    return EncodedBatch([d for d, _, _ in good], [p for _, _, p in good]), labels, len(samples) - len(good)


class DeviceAugment:
    """The training transform of :func:`train_transform` (RandomResizedCrop, horizontal flip, normalization)
    on the training device, after decoding there: JPEGs in one ``decode_jpeg`` call (nvJPEG on CUDA), other
    formats by the CPU decoder; a file neither can decode is logged once, skipped and counted."""

    def __init__(self, crop: int = 224) -> None:
        self.crop, self.unreadable = crop, UnreadableFiles()

    def _decode(self, batch: EncodedBatch, device: torch.device) -> list[torch.Tensor | None]:
        try:
            return list(decode_jpeg(batch.data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # a file that is no JPEG, or a damaged one: find which, one by one
            images: list[torch.Tensor | None] = []
            for data, path in zip(batch.data, batch.paths):
                try:
                    images.append(decode_image(data, mode=ImageReadMode.RGB).to(device))
                except RuntimeError as err:
                    self.unreadable.skip(path, err)
                    images.append(None)
            return images

    def __call__(
        self, batch: EncodedBatch, labels: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Normalized ``[N, 3, crop, crop]`` float images on ``device``, their labels, and how many were skipped."""
        crops, kept = [], []
        for i, image in enumerate(self._decode(batch, device)):
            if image is None:
                continue
            top, left, height, width = T.RandomResizedCrop.get_params(image, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
            image = TF.resized_crop(image, top, left, height, width, [self.crop, self.crop], antialias=True)
            crops.append(image.flip(-1) if torch.rand(()) < 0.5 else image)
            kept.append(i)
        if not crops:
            return torch.empty(0, device=device), labels[:0].to(device), len(batch)
        images = torch.stack(crops).float().div_(255)
        images = (images - _MEAN.to(device)) / _STD.to(device)
        return images, labels[kept].to(device, non_blocking=True), len(batch) - len(kept)


def imagenet_datasets(
    data_dir: str | os.PathLike, crop: int = 224, test_crop: int | None = None, encoded: bool = False
) -> tuple[ImageFolder, ImageFolder]:
    """Train and val sets of an ImageNet-layout folder, with the standard transforms; val takes
    train's classes (one label space). ``encoded``: the train set yields the files' bytes
    (:class:`EncodedImageFolder`), for :class:`DeviceAugment`."""
    data_dir = Path(data_dir)
    missing = [s for s in ("train", "val") if not (data_dir / s).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"data_dir {data_dir} lacks {' and '.join(missing)}/: expected the ImageNet layout "
            f"{data_dir}/train/<wnid>/*.JPEG and {data_dir}/val/<wnid>/*.JPEG (val sorted into "
            f"class folders); leave data_dir empty to use the embedded Fashion-MNIST"
        )
    train = (
        EncodedImageFolder(data_dir / "train") if encoded else ImageFolder(data_dir / "train", train_transform(crop))
    )
    return train, ImageFolder(data_dir / "val", eval_transform(test_crop or crop), classes=train.classes)


class FashionMNIST(Dataset):
    """Fashion-MNIST as 3-channel tensors of side ``size`` (the embedded default data).

    ``subset`` takes the first n images of a split (balanced enough: the files are shuffled);
    ``augment`` adds a padded random crop and a flip. The grey images are normalized per channel
    with the ImageNet mean and std, as the detection and segmentation data are, so a backbone
    trained here sees the input statistics of the tasks it is transferred to.
    """

    classes = FASHION_CLASSES

    def __init__(self, split: str = "train", size: int = 32, subset: int | None = None, augment: bool = False) -> None:
        images, labels = load_fashion_mnist(split)
        if subset:
            images, labels = images[:subset], labels[:subset]
        x = torch.from_numpy(np.array(images)).float().div_(255).unsqueeze(1)
        if size != x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        self.images = x.to(torch.float32)
        self.labels = torch.from_numpy(labels)
        self.augment, self.pad = augment, size // 8

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        x = self.images[index]
        if self.augment:
            size = x.shape[-1]
            x = F.pad(x, (self.pad,) * 4, value=float(x.min()))
            i, j = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = x[:, i : i + size, j : j + size]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x.expand(3, -1, -1) - _MEAN) / _STD, int(self.labels[index])
