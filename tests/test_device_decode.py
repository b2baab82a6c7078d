"""ImageNet training images decoded and augmented on the training device (decode_on="device"), here with
the CPU as that device: the same crop, flip and normalization, other formats through the CPU decoder, an
undecodable file skipped and counted."""

import logging

import pytest
import torch
from PIL import Image

from pyconv_core.data.classification import DeviceAugment, EncodedImageFolder, collate_encoded
from pyconv_core.engine.logging import read_metrics
from pyconv_core.tasks.classification import Params, run


def test_encoded_images_are_cropped_flipped_and_normalized_on_the_device(imagenet_dir, tmp_path, caplog):
    folder = EncodedImageFolder(imagenet_dir / "train")
    corrupt = next(i for i, (path, _) in enumerate(folder.samples) if "corrupt" in path.name)
    first = folder.samples[0][0]
    png = tmp_path / "n00000000" / "as_png.png"
    png.parent.mkdir()
    Image.open(first).save(png)
    items = [
        folder[0],
        folder[1],
        folder[corrupt],
        (torch.frombuffer(bytearray(png.read_bytes()), dtype=torch.uint8), 5, str(png)),
    ]
    batch, labels, skipped = collate_encoded(items)
    assert skipped == 0 and len(batch) == 4
    augment = DeviceAugment(crop=32)
    with caplog.at_level(logging.WARNING):
        torch.manual_seed(0)
        images, kept, failed = augment(batch, labels, torch.device("cpu"))
        torch.manual_seed(0)
        again, _, _ = augment(batch, labels, torch.device("cpu"))
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32 and failed == 1
    assert kept.tolist() == [labels[0].item(), labels[1].item(), 5]  # the corrupt one left out, the PNG read
    assert torch.equal(images, again)  # the crops come from torch's generator: seeded, reproducible
    assert -2.2 < images.min() < images.max() < 2.7  # ImageNet-normalized pixels
    assert caplog.text.count("corrupt.JPEG") == 1


def test_a_run_decoding_on_the_device_trains_and_counts_the_corrupt_file(imagenet_dir, tmp_path):
    # one batch of all 37 training files: the corrupt one is in it
    p = Params(
        arch="resnet",
        depth=18,
        data_dir=str(imagenet_dir),
        crop=32,
        epochs=1,
        batch_size=37,
        decode_on="device",
        runs_dir=str(tmp_path),
        run_name="device",
        progress=False,
    )
    result = run(p)
    train, evals = read_metrics(result.run_dir, "train")[0], read_metrics(result.run_dir, "eval")[0]
    assert train["num_skipped"] == 1 and train["samples_per_s"] > 0
    assert evals["num_skipped"] == 1 and evals["num_samples"] == 12  # validation decodes in the loader


def test_decoding_on_the_device_needs_image_files():
    with pytest.raises(ValueError, match=r"decode_on 'device' decodes ImageNet JPEG files and needs data_dir"):
        Params(decode_on="device")
    with pytest.raises(ValueError, match=r"decode_on must be one of 'loader', 'device'"):
        Params(decode_on="gpu")
