"""Shared fixtures: small data sets in the real formats, generated from real Fashion-MNIST items."""

import multiprocessing
import os

import numpy as np
import pytest
from PIL import Image

from pyconv_core.data.fashion_mnist import load_fashion_mnist

os.environ.setdefault("PYCONV_PROGRESS", "0")
# Tests that time PyConv plans measure in their own process; the reuse of a machine's plan cache
# across processes has its own test (test_pyconv_plans).
os.environ.setdefault("PYCONV_PLAN_CACHE", "off")


@pytest.fixture(scope="session")
def imagenet_dir(tmp_path_factory):
    """An ImageNet-layout folder (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) of 3 classes, plus one
    corrupt JPEG in each split."""
    root = tmp_path_factory.mktemp("imagenet")
    images, labels = load_fashion_mnist("test")
    wnids = {0: "n00000000", 1: "n00000001", 7: "n00000007"}
    for split, (start, per_class) in {"train": (0, 12), "val": (5000, 4)}.items():
        for label, wnid in wnids.items():
            folder = root / split / wnid
            folder.mkdir(parents=True)
            idx = np.flatnonzero(labels[start:] == label)[:per_class] + start
            for i in idx:
                Image.fromarray(images[i]).convert("RGB").save(folder / f"{wnid}_{i}.JPEG", quality=95)
        (root / split / "n00000001" / "n00000001_corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def pytest_sessionfinish(session, exitstatus):
    """Fail, instead of hanging, when a test leaves a child process (e.g. a DataLoader worker, which blocks
    SIGTERM) alive: multiprocessing's exit handler would wait for it forever. The children are named and killed."""
    left = multiprocessing.active_children()
    if left:
        print(f"\nchild processes left alive by the tests (killed): {left}")
        for child in left:
            child.kill()
            child.join()
        session.exitstatus = 1
