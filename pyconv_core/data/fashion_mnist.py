"""Fashion-MNIST (Xiao et al. 2017): 70,000 real 28x28 grey images of 10 clothing classes.

The embedded default data of every notebook. Debian's package ``dataset-fashion-mnist``
installs the original idx ``.gz`` files offline; the environment variable ``FASHION_MNIST_DIR``,
read at each load, points at another folder holding them. The detection, segmentation and video
demo sets are generated from these same real items.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

__all__ = ["DEBIAN_DIR", "CLASSES", "fashion_mnist_dir", "load_fashion_mnist"]

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # where dataset-fashion-mnist installs the files
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def fashion_mnist_dir() -> Path:
    """The folder of the idx files: ``$FASHION_MNIST_DIR`` if set (read now, so setting it in a running
    notebook takes effect), else Debian's."""
    return Path(os.environ.get("FASHION_MNIST_DIR") or DEBIAN_DIR)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(
            f"{path} is not an idx file of the expected kind (magic {found:#x}, expected "
            f"{magic:#x}); reinstall it with `sudo apt-get install --reinstall dataset-fashion-mnist`, or "
            f"replace it with the original file of that name"
        )
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 28, 28]`` and labels ``int64 [N]`` of the ``train`` (60k) or ``test`` (10k) split."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else fashion_mnist_dir()
    images_file, labels_file = (root / name for name in _FILES[split])
    for path in (images_file, labels_file):
        if not path.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {path} is missing. It is the embedded default data set: install it "
                f"with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; `make setup` does this), "
                f"or set the environment variable FASHION_MNIST_DIR to a folder holding the four idx .gz files "
                f"({', '.join(name for pair in _FILES.values() for name in pair)})."
            )
    images = _read_idx(images_file, 0x00000803)
    labels = _read_idx(labels_file, 0x00000801).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{images_file} has {len(images)} images but {labels_file} has {len(labels)} labels")
    return images, labels
