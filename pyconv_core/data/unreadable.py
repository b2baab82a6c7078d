"""Unreadable files never stop an epoch, in any task.

A dataset's ``__getitem__`` returns ``None`` for an item whose file cannot be decoded (truncated,
or not an image at all) and logs the file's path, once per dataset object and process (each
DataLoader worker logs for itself). The task's collate function drops such items and passes their
count on as the batch's last element, which the task reports as ``num_skipped``: per epoch in the
training rows of ``metrics.jsonl``, and in the evaluation metrics. Prediction helpers and galleries
work by dataset index, so a skipped item never shifts another item's title or image. An image of
more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (:func:`open_image`) is skipped the same way.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

__all__ = ["UnreadableFiles", "UnreadableFileError", "open_image"]

log = logging.getLogger(__name__)


@contextmanager
def open_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """``PIL.Image.open``, refusing an image of more than ``Image.MAX_IMAGE_PIXELS`` pixels with an OSError,
    as a file that cannot be decoded. PIL only warns (DecompressionBombWarning) up to twice the limit and
    raises DecompressionBombError, which is no OSError, beyond: decoding such a file (a decompression bomb,
    or a scan that is not a training image) would stall a DataLoader worker or exhaust its memory."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise OSError(
            f"{err} (over PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}; raise it to read such images)"
        ) from None
    with image:
        yield image


class UnreadableFileError(OSError):
    """A file that cannot be decoded; ``path`` names it, ``reason`` is the decoder's error and ``fix``
    what to do in the dataset's layout (the skip's log line says it too)."""

    def __init__(self, path: str | os.PathLike, reason: Exception, fix: str) -> None:
        super().__init__(f"cannot decode {path} ({reason}); {fix}")
        self.path, self.reason, self.fix = Path(path), reason, fix


class UnreadableFiles:
    """The files a dataset could not decode; each is logged the first time it is met."""

    def __init__(self) -> None:
        self.paths: set[str] = set()

    def skip(self, path: str | os.PathLike, err: Exception, fix: str = "replace or remove it") -> None:
        """Record that ``path`` could not be decoded (because of ``err``); log it once, with ``fix``: what
        to do in the dataset's layout (an ADE20K mask is removed with its image, a COCO image with its entry)."""
        if str(path) not in self.paths:
            self.paths.add(str(path))
            log.warning("skipping unreadable file %s (%s); %s (counted in num_skipped)", path, err, fix)
