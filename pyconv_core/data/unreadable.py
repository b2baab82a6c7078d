"""Unreadable files never stop an epoch, in any task.

A dataset's ``__getitem__`` returns ``None`` for an item whose file cannot be decoded (truncated,
or not an image at all) and logs the file's path, once per dataset object and process (each
DataLoader worker logs for itself). The task's collate function drops such items and passes their
count on as the batch's last element, which the task reports as ``num_skipped``: per epoch in the
training rows of ``metrics.jsonl``, and in the evaluation metrics. Prediction helpers and galleries
work by dataset index, so a skipped item never shifts another item's title or image.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["UnreadableFiles", "UnreadableFileError"]

log = logging.getLogger(__name__)


class UnreadableFileError(OSError):
    """A file that cannot be decoded; ``path`` names it and ``reason`` is the decoder's error."""

    def __init__(self, path: str | os.PathLike, reason: Exception, fix: str) -> None:
        super().__init__(f"cannot decode {path} ({reason}); {fix}")
        self.path, self.reason = Path(path), reason


class UnreadableFiles:
    """The files a dataset could not decode; each is logged the first time it is met."""

    def __init__(self) -> None:
        self.paths: set[str] = set()

    def skip(self, path: str | os.PathLike, err: Exception) -> None:
        """Record that ``path`` could not be decoded (because of ``err``); log it once."""
        if str(path) not in self.paths:
            self.paths.add(str(path))
            log.warning("skipping unreadable file %s (%s); replace or remove it (counted in num_skipped)", path, err)
