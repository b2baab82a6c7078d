"""Honest advice: each error or warning that tells the user what to do is followed here, and what it
advised then works (data loaders, checkpoints, inflation, backbones, choices and did-you-mean).

Each test first shows the message on a small real fixture, then does what the message says and
runs the refused operation again.
"""

import dataclasses
import gzip
import json
import logging
import re
import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pyconv_core import CheckpointMismatchError, build, load_official_checkpoint, to_official_state_dict
from pyconv_core.bench import BenchSettings, make_candidate, run_bench
from pyconv_core.data.ade20k import ADE20K, ADE20K_CLASSES
from pyconv_core.data.classification import FashionMNIST, ImageFolder, imagenet_datasets
from pyconv_core.data.coco import CocoDetection
from pyconv_core.data.demo_detection import DemoDetectionConfig, make_demo_coco
from pyconv_core.data.fashion_mnist import DEBIAN_DIR, load_fashion_mnist
from pyconv_core.engine.logging import read_metrics, write_json
from pyconv_core.models.official import load_backbone_weights, load_model_weights
from pyconv_core.models.segmentation import segmentation_net
from pyconv_core.models.video import inflate_2d
from pyconv_core.tasks import classification as C, detection as D, segmentation as S
from tests.test_detection_data import _ann, _edit_json, _write_coco
from tests.test_segmentation import _write_ade


def _message(raised: pytest.ExceptionInfo) -> str:
    return str(raised.value)


# ---- unreadable files: replace or remove them; raise PIL.Image.MAX_IMAGE_PIXELS ------------------


@pytest.fixture
def imagenet_copy(imagenet_dir, tmp_path):
    """A copy of the shared ImageNet-layout folder (one corrupt JPEG per split) that a test may change."""
    return shutil.copytree(imagenet_dir, tmp_path / "imagenet")


def _unreadable(dataset) -> list[int]:
    return [i for i in range(len(dataset)) if dataset[i] is None]


def test_a_corrupt_image_replaced_or_removed_is_read(imagenet_copy, caplog):
    train, val = imagenet_datasets(imagenet_copy, crop=32)
    with caplog.at_level(logging.WARNING):
        assert len(_unreadable(train)) == len(_unreadable(val)) == 1
    assert caplog.text.count("; replace or remove it (counted in num_skipped)") == 2
    corrupt = "n00000001/n00000001_corrupt.JPEG"
    Image.new("RGB", (28, 28), (90, 90, 90)).save(imagenet_copy / "val" / corrupt)  # replace
    (imagenet_copy / "train" / corrupt).unlink()  # remove
    train, val = imagenet_datasets(imagenet_copy, crop=32)
    assert _unreadable(train) == _unreadable(val) == [] and len(val) == 13 and len(train) == 36


def test_raising_max_image_pixels_reads_the_large_image(imagenet_copy, monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    folder = imagenet_copy / "val" / "n00000000"
    Image.new("RGB", (64, 64), (90, 90, 90)).save(folder / "n00000000_large.JPEG")
    val = ImageFolder(folder.parent)
    large = [p.name for p, _ in val.samples].index("n00000000_large.JPEG")
    with caplog.at_level(logging.WARNING):
        assert val[large] is None
    assert "(over PIL.Image.MAX_IMAGE_PIXELS = 1500; raise it to read such images)" in caplog.text
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    assert val[large][0].size == (64, 64)


# ---- the ImageNet folder ---------------------------------------------------------------------------


def test_a_missing_val_folder_made_or_data_dir_left_empty_gives_data(imagenet_copy, tmp_path):
    shutil.move(imagenet_copy / "val", tmp_path / "val")
    with pytest.raises(FileNotFoundError) as raised:
        imagenet_datasets(imagenet_copy, crop=32)
    assert _message(raised).endswith(
        f"lacks val/: expected the ImageNet layout {imagenet_copy}/train/<wnid>/*.JPEG "
        f"and {imagenet_copy}/val/<wnid>/*.JPEG (val sorted into class folders); leave "
        f"data_dir empty to use the embedded Fashion-MNIST"
    )
    train, val, classes = C.datasets(C.Params(data_dir="", image_size=16, train_subset=8, val_subset=4))
    assert (len(train), len(val), len(classes)) == (8, 4, 10) and train[0][0].shape == (3, 16, 16)
    shutil.move(tmp_path / "val", imagenet_copy / "val")  # the layout the message gives
    assert len(imagenet_datasets(imagenet_copy, crop=32)[1]) == 13


@pytest.mark.parametrize("fix", ["remove the folder", "add its class to train/"])
def test_a_validation_class_unknown_to_training_removed_or_added_to_train_is_read(imagenet_copy, fix):
    shutil.copytree(imagenet_copy / "val" / "n00000007", imagenet_copy / "val" / "n00000009")
    with pytest.raises(ValueError) as raised:
        imagenet_datasets(imagenet_copy, crop=32)
    assert _message(raised).endswith("; remove the folder or add its class to train/")
    if fix == "remove the folder":
        shutil.rmtree(imagenet_copy / "val" / "n00000009")
    else:
        shutil.copytree(imagenet_copy / "train" / "n00000007", imagenet_copy / "train" / "n00000009")
    train, val = imagenet_datasets(imagenet_copy, crop=32)
    assert val.classes == train.classes and len(train.classes) == (3 if fix == "remove the folder" else 4)


def test_class_folders_without_images_given_an_image_are_read(tmp_path):
    (tmp_path / "train" / "n00000000").mkdir(parents=True)
    (tmp_path / "train" / "n00000000" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=re.escape("expected one folder per class holding image files (")):
        ImageFolder(tmp_path / "train")
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "n00000000" / "n00000000_1.JPEG")
    assert len(ImageFolder(tmp_path / "train")) == 1


# ---- Fashion-MNIST: FASHION_MNIST_DIR points at the idx files ---------------------------------------


def _write_idx(path, array: np.ndarray) -> None:
    """An idx file as Fashion-MNIST ships it: magic (uint8, ndim), big-endian sizes, the bytes; gzipped."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_dir_set_after_import_to_a_folder_of_the_four_files_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as raised:
        FashionMNIST("test")
    assert _message(raised).endswith(
        "or set the environment variable FASHION_MNIST_DIR to a folder holding the four idx .gz files "
        "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz)."
    )
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    for split in ("train", "t10k"):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.array([4, 0, 9]))
    data = FashionMNIST("test", size=28)
    assert len(data) == 3 and data.labels.tolist() == [4, 0, 9]  # the folder's files, not Debian's


def test_a_wrong_idx_file_replaced_by_the_original_is_read(tmp_path, monkeypatch):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(DEBIAN_DIR / name, tmp_path / name)
    shutil.copy(DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz", tmp_path / "t10k-images-idx3-ubyte.gz")  # a mix-up
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(
        ValueError,
        match=r"t10k-images-idx3-ubyte.gz is not an idx file of the expected kind .*; "
        r"reinstall it .* or replace it with the original file of that name",
    ):
        load_fashion_mnist("test")
    shutil.copy(DEBIAN_DIR / "t10k-images-idx3-ubyte.gz", tmp_path / "t10k-images-idx3-ubyte.gz")
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and len(labels) == 10000


# ---- COCO --------------------------------------------------------------------------------------------


def _coco(tmp_path):
    """Two images, two annotations of the categories 3 and 9 (val2017)."""
    return _write_coco(
        tmp_path / "coco",
        {"a.jpg": (1, 80, 60), "b.jpg": (2, 80, 60)},
        [_ann(1, 1, [1, 1, 5, 5]), _ann(2, 2, [1, 1, 5, 5], category_id=9)],
    )


def test_coco_files_put_where_the_layout_says_are_read(tmp_path):
    root = _coco(tmp_path)
    ann_file = root / "annotations" / "instances_val2017.json"
    shutil.move(ann_file, tmp_path / "instances_val2017.json")
    layout = "COCO's layout is <root>/annotations/instances_<split>.json"
    with pytest.raises(FileNotFoundError, match=re.escape(layout)):
        CocoDetection(root, "val2017")
    shutil.move(tmp_path / "instances_val2017.json", ann_file)
    shutil.move(root / "val2017", tmp_path / "images")
    with pytest.raises(
        FileNotFoundError,
        match=re.escape("the COCO layout is <root>/val2017/*.jpg next to <root>/annotations/instances_val2017.json"),
    ):
        CocoDetection(root, "val2017")
    shutil.move(tmp_path / "images", root / "val2017")
    assert len(CocoDetection(root, "val2017")) == 2


def test_an_invalid_json_file_regenerated_is_read(tmp_path):
    root = _coco(tmp_path)
    ann_file = root / "annotations" / "instances_val2017.json"
    good = ann_file.read_text()
    ann_file.write_text(good[: len(good) // 2])  # an interrupted download
    with pytest.raises(ValueError, match="is not valid JSON .*; re-download or regenerate it"):
        CocoDetection(root, "val2017")
    ann_file.write_text(good)
    assert len(CocoDetection(root, "val2017")) == 2


@pytest.mark.parametrize(
    "section, index, key",
    [
        ("images", 1, "height"),
        ("images", 0, "file_name"),
        ("annotations", 1, "bbox"),
        ("annotations", 0, "image_id"),
        ("annotations", 1, "category_id"),
        ("categories", 1, "name"),
        ("categories", 0, "id"),
    ],
)
@pytest.mark.parametrize("fix", ["fix", "remove"])
def test_an_entry_without_a_required_field_fixed_or_removed_is_read(tmp_path, section, index, key, fix):
    root = _coco(tmp_path)
    original = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    _edit_json(root, lambda d: d[section][index].pop(key))
    with pytest.raises(ValueError) as raised:
        CocoDetection(root, "val2017")
    tail = (
        "Fix the entry, or remove it and the annotations of its category."
        if section == "categories"
        else ("Fix or remove the entry.")
    )
    assert _message(raised).endswith(tail)
    if fix == "fix":
        _edit_json(root, lambda d: d[section][index].update({key: original[section][index][key]}))
    else:
        category = original["categories"][index]["id"]
        _edit_json(
            root,
            lambda d: (
                d[section].pop(index),
                section == "categories"
                and d.update(annotations=[a for a in d["annotations"] if a["category_id"] != category]),
            ),
        )
    data = CocoDetection(root, "val2017")
    assert len(data) == (1 if (fix, section) == ("remove", "images") else 2)
    assert len(data.class_names) == (2 if (fix, section) == ("remove", "categories") else 3)


@pytest.mark.parametrize("fix", ["add the category", "correct the category_id"])
def test_an_annotation_of_an_unlisted_category_is_read_once_listed_or_corrected(tmp_path, fix):
    root = _coco(tmp_path)
    _edit_json(root, lambda d: d["annotations"][1].update(category_id=42))
    with pytest.raises(ValueError) as raised:
        CocoDetection(root, "val2017")
    assert "add the category to categories, or correct the annotation's category_id." in _message(raised)
    if fix == "add the category":
        _edit_json(root, lambda d: d["categories"].append({"id": 42, "name": "kite"}))
    else:
        _edit_json(root, lambda d: d["annotations"][1].update(category_id=9))
    data = CocoDetection(root, "val2017")
    assert data.class_names[-1] == ("kite" if fix == "add the category" else "boat") and len(data) == 2


def test_an_image_file_put_where_file_name_points_is_read(tmp_path):
    root = _coco(tmp_path)
    shutil.move(root / "val2017", tmp_path / "elsewhere")
    (root / "val2017").mkdir()
    with pytest.raises(ValueError) as raised:
        CocoDetection(root, "val2017")
    assert (
        f"no file at {root / 'val2017' / 'a.jpg'} and others (file_name is taken relative to "
        f"{root / 'val2017'})" in _message(raised)
    )
    for name in ("a.jpg", "b.jpg"):
        shutil.move(tmp_path / "elsewhere" / name, root / "val2017" / name)
    assert len(CocoDetection(root, "val2017")) == 2


def _truncate(path) -> None:
    """Keep half of a file's bytes, as an interrupted copy does."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("fix", ["replace the file", "remove its entry"])
def test_an_unreadable_coco_image_replaced_or_its_entry_removed_is_read(tmp_path, caplog, fix):
    root = _coco(tmp_path)
    _truncate(root / "val2017" / "b.jpg")
    with caplog.at_level(logging.WARNING):
        assert _unreadable(CocoDetection(root, "val2017")) == [1]
    ann_file = root / "annotations" / "instances_val2017.json"
    assert (
        f"b.jpg (Truncated File Read); replace the file or remove its entry from {ann_file} (counted in "
        f"num_skipped)" in caplog.text
    )
    if fix == "replace the file":
        Image.new("RGB", (80, 60)).save(root / "val2017" / "b.jpg")
    else:
        _edit_json(root, lambda d: d.update(images=d["images"][:1]))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        data = CocoDetection(root, "val2017")
        assert _unreadable(data) == [] and len(data) == (2 if fix == "replace the file" else 1)
    assert "skipped" not in caplog.text


def test_train_and_val_files_given_the_same_categories_list_are_read(tmp_path):
    root = make_demo_coco(tmp_path / "demo_coco", DemoDetectionConfig(num_train=8, num_val=4, image_size=64))
    _edit_json(root, lambda d: d["categories"][0].update(name="renamed"))
    p = D.Params(data_dir=str(root), image_size=64)
    with pytest.raises(ValueError, match="so give both files the same categories list$"):
        D.datasets(p)
    train_categories = json.loads((root / "annotations" / "instances_train2017.json").read_text())["categories"]
    _edit_json(root, lambda d: d.update(categories=train_categories))
    train, val = D.datasets(p)
    assert train.class_names == val.class_names and len(val) == 4


# ---- ADE20K ------------------------------------------------------------------------------------------


def test_root_pointed_at_ade_challenge_data_2016_is_read(tmp_path):
    root = _write_ade(tmp_path / "ADEChallengeData2016")
    with pytest.raises(FileNotFoundError, match="point root at ADEChallengeData2016 .* holding images/training/"):
        ADE20K(root / "images")
    assert len(ADE20K(root)) == 2


@pytest.mark.parametrize("fix", ["fix it", "remove it"])
def test_a_malformed_object_info_fixed_or_removed_is_read(tmp_path, fix):
    root = _write_ade(tmp_path)
    (root / "objectInfo150.txt").write_text("Idx Name\n1 wall\n")
    with pytest.raises(ValueError, match=re.escape("fix or remove it (without it the 150 ADE20K names are used)")):
        ADE20K(root)
    if fix == "fix it":
        (root / "objectInfo150.txt").write_text(
            "Idx\tRatio\tTrain\tVal\tName\n1\t0.2\t1\t1\twall\n2\t0.1\t1\t1\tbuilding, edifice\n3\t0.1\t1\t1\tsky\n"
        )
    else:
        (root / "objectInfo150.txt").unlink()
    assert ADE20K(root).classes == (("wall", "building", "sky") if fix == "fix it" else ADE20K_CLASSES)


@pytest.mark.parametrize("fix", ["remove the image", "add its mask"])
def test_an_image_without_mask_removed_or_given_its_mask_is_read(tmp_path, fix):
    root = _write_ade(tmp_path)
    mask = root / "annotations" / "training" / "ADE_train_00000002.png"
    shutil.move(mask, tmp_path / "mask.png")
    with pytest.raises(FileNotFoundError, match=re.escape("(re-extract the data set, or remove the image)")):
        ADE20K(root)
    if fix == "remove the image":
        (root / "images" / "training" / "ADE_train_00000002.jpg").unlink()
    else:
        shutil.move(tmp_path / "mask.png", mask)
    data = ADE20K(root)
    data.check()
    assert len(data) == (1 if fix == "remove the image" else 2)


@pytest.mark.parametrize("fix", ["fix the pair", "remove the pair"])
def test_masks_of_the_wrong_kind_fixed_or_removed_pass_the_check(tmp_path, fix):
    root = _write_ade(tmp_path, sizes=((40, 30), (36, 36), (20, 20)))
    masks = root / "annotations" / "training"
    labels = [np.asarray(Image.open(masks / f"ADE_train_0000000{i}.png")) for i in (1, 2)]
    Image.fromarray(labels[0][:10, :10]).save(masks / "ADE_train_00000001.png")  # another size
    Image.fromarray(np.stack([labels[1]] * 3, -1)).save(masks / "ADE_train_00000002.png")  # a colour mask
    with pytest.raises(ValueError) as raised:
        ADE20K(root).check()
    assert "but its mask" in _message(raised) and _message(raised).endswith(
        "image and mask must have the same size (1 more masks of training fail this check); fix or remove the pair "
        "before training"
    )
    if fix == "fix the pair":  # masks of the image's size, 8-bit single-channel
        for i, label in enumerate(labels, 1):
            Image.fromarray(label).save(masks / f"ADE_train_0000000{i}.png")
    else:
        for name in ("ADE_train_00000001", "ADE_train_00000002"):
            (root / "images" / "training" / f"{name}.jpg").unlink()
            (masks / f"{name}.png").unlink()
    data = ADE20K(root)
    data.check()
    assert _unreadable(data) == [] and len(data) == (3 if fix == "fix the pair" else 1)


@pytest.mark.parametrize("fix", ["correct the mask", "list its classes"])
def test_a_label_beyond_the_class_list_corrected_or_listed_passes_the_check(tmp_path, fix):
    root = _write_ade(tmp_path)  # labels 0..3
    info = "Idx\tRatio\tTrain\tVal\tName\n" + "".join(f"{i}\t0.1\t1\t1\tclass{i}\n" for i in (1, 2))
    (root / "objectInfo150.txt").write_text(info)
    with pytest.raises(ValueError) as raised:
        ADE20K(root).check()
    assert "holds label 3 but the data set has 2 classes" in _message(raised)
    assert "correct the mask, or list its classes in objectInfo150.txt" in _message(raised)
    if fix == "correct the mask":
        for mask in (root / "annotations" / "training").iterdir():
            Image.fromarray(np.minimum(np.asarray(Image.open(mask)), 2)).save(mask)
    else:
        (root / "objectInfo150.txt").write_text(info + "3\t0.1\t1\t1\tclass3\n")
    data = ADE20K(root)
    data.check()
    mask = data[0][1]
    assert int(mask[mask != 255].max()) == (1 if fix == "correct the mask" else 2)


@pytest.mark.parametrize("which, fix", [("image", "replace"), ("mask", "replace"), ("mask", "remove the pair")])
def test_an_unreadable_image_or_mask_replaced_or_removed_with_its_pair_is_read(tmp_path, caplog, which, fix):
    root = _write_ade(tmp_path, sizes=((40, 30), (36, 36), (20, 20)))
    pair = {
        "image": root / "images" / "training" / "ADE_train_00000002.jpg",
        "mask": root / "annotations" / "training" / "ADE_train_00000002.png",
    }
    good = pair[which].read_bytes()
    _truncate(pair[which])
    data = ADE20K(root)
    with caplog.at_level(logging.WARNING):
        data.check()
        assert _unreadable(data) == [1]
    assert (
        caplog.text.count(f"{pair[which]} (") == 1
        and "; replace the file, or remove the image and its mask (counted in num_skipped)" in caplog.text
    )
    if fix == "replace":
        pair[which].write_bytes(good)
    else:
        for path in pair.values():
            path.unlink()
    data = ADE20K(root)
    data.check()
    assert _unreadable(data) == [] and len(data) == (3 if fix == "replace" else 2)


# ---- checkpoints of the authors' layout and of whole models -----------------------------------------


def test_a_checkpoint_path_that_exists_is_loaded(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="pass the path of a .pth/.pt file saved by the authors' code or by this workbook"
    ):
        load_official_checkpoint(build("resnet18", num_classes=3), tmp_path / "resnet18.pth")
    torch.save(to_official_state_dict(build("resnet18", num_classes=3)), tmp_path / "resnet18.pth")
    load_official_checkpoint(build("resnet18", num_classes=3), tmp_path / "resnet18.pth")


@pytest.mark.parametrize("content", ["broken bytes", "a pickled model"])
def test_a_checkpoint_re_saved_as_a_plain_state_dict_is_loaded(tmp_path, content):
    model, path = build("resnet18", num_classes=3), tmp_path / "resnet18.pth"
    if content == "broken bytes":
        path.write_bytes(b"PK\x03\x04 half a download")
    else:
        torch.save(model, path)  # the whole module: classes a weights-only load refuses
    with pytest.raises(CheckpointMismatchError, match=re.escape("torch.save(model.state_dict(), path)")):
        load_official_checkpoint(build("resnet18", num_classes=3), path)
    torch.save(model.state_dict(), path)
    loaded = load_official_checkpoint(build("resnet18", num_classes=3), path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_checkpoint_loaded_into_the_architecture_depth_and_num_classes_it_names_fits():
    state = to_official_state_dict(build("pyconvresnet18", num_classes=10))
    with pytest.raises(
        CheckpointMismatchError, match="Check the architecture name and depth .and num_classes for the classifier."
    ):
        load_official_checkpoint(build("pyconvresnet34", num_classes=1000), state)
    with pytest.raises(CheckpointMismatchError, match="fc.weight: checkpoint .10, 512. vs model .1000, 512."):
        load_official_checkpoint(build("pyconvresnet18", num_classes=1000), state)
    load_official_checkpoint(build("pyconvresnet18", num_classes=10), state)


def test_a_backbone_checkpoint_of_the_same_family_and_depth_is_loaded():
    state = build("pyconvresnet18", num_classes=10).state_dict()  # this workbook's layout (".levels.")
    with pytest.raises(CheckpointMismatchError, match="Use a classifier checkpoint of the same family and depth.$"):
        load_backbone_weights(build("pyconvresnet34", num_classes=0), state)
    backbone = load_backbone_weights(build("pyconvresnet18", num_classes=0), state)
    assert torch.equal(backbone.conv1.weight, state["conv1.weight"])


def test_whole_model_weights_loaded_into_the_model_their_run_recorded_fit(tmp_path):
    source = build("pyconvresnet18", num_classes=4)
    path = tmp_path / "best.pt"
    torch.save({"model": source.state_dict(), "model_args": source.model_args}, path)
    with pytest.raises(CheckpointMismatchError) as raised:
        load_model_weights(build("resnet18", num_classes=4), path)
    assert _message(raised).endswith(
        "pass weights of a resnet18, or set the model parameters (arch, depth, head, "
        "...) to those of the checkpoint's run"
    )
    recorded = torch.load(path, weights_only=True)["model_args"]
    model = load_model_weights(build(**recorded), path)
    assert torch.equal(model.fc.weight, source.fc.weight)
    with pytest.raises(
        CheckpointMismatchError,
        match=re.escape("Use weights of the same model (architecture, depth, number of classes)."),
    ):
        load_model_weights(build("pyconvresnet18", num_classes=3), path)


# ---- video inflation, backbones ------------------------------------------------------------------------


def test_inflation_from_the_2d_network_of_the_same_family_and_blocks_works():
    model = build("resnet3d50", num_classes=5, stage_blocks=(1, 1, 1, 1))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "pass the 2D network of the same family and blocks (resnet50 for "
            "resnet3d50, pyconvresnet50 for pyconvresnet3d50)"
        ),
    ):
        inflate_2d(model, build("pyconvresnet50", stage_blocks=(1, 1, 1, 1)))
    twin = build("resnet50", stage_blocks=(1, 1, 1, 1))
    assert inflate_2d(model, twin) == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(model.conv1.weight.sum(2), twin.conv1.weight)


def test_backbone_weights_passed_explicitly_when_both_demo_folders_hold_other_experiments(tmp_path):
    p = C.Params(arch="resnet", depth=18, runs_dir=str(tmp_path))
    name = C.train_config(p).run_name
    for folder, other in ((name, dict(lr=0.3)), (f"{name}-backbone", dict(seed=1))):
        write_json(
            tmp_path / folder / "config.json",
            {"train": dataclasses.asdict(C.train_config(dataclasses.replace(p, **other)))},
        )
    with pytest.raises(ValueError, match="rename one, or pass backbone_weights explicitly$"):
        C.resolve_backbone_weights(C.DEMO_BACKBONE, "resnet", 18, str(tmp_path))
    classifier = build("resnet18", num_classes=10)
    torch.save(classifier.state_dict(), tmp_path / "resnet18.pt")
    detection = D.Params(arch="ssd", depth=18, backbone_weights=str(tmp_path / "resnet18.pt"), runs_dir=str(tmp_path))
    ssd = D.build_model(detection, num_classes=3)
    segmentation = S.Params(
        head="fcn", depth=18, backbone="resnet", backbone_weights=str(tmp_path / "resnet18.pt"), runs_dir=str(tmp_path)
    )
    fcn = S.build_model(segmentation, num_classes=3)
    for model in (ssd, fcn):
        stem = next(v for k, v in model.state_dict().items() if k.endswith("conv1.weight"))
        assert torch.equal(stem, classifier.conv1.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, f"{name}-backbone", "resnet18.pt"])


# ---- choices: did you mean, choose one of --------------------------------------------------------------


def _suggested(message: str, pattern: str) -> list[str]:
    found = re.search(pattern, message)
    assert found, message
    return [name.strip(" '") for name in found.group(1).split(",")]


def test_the_model_name_suggested_for_a_typo_builds():
    with pytest.raises(ValueError) as raised:
        build("pyconvresnet1B", num_classes=3)
    suggested = _suggested(_message(raised), r"Did you mean ([^?]+)\?")
    assert "pyconvresnet18" in suggested
    for name in suggested:
        assert build(name, num_classes=3).model_args["name"] == name


@pytest.mark.parametrize(
    "args, pattern",
    [
        (dict(head="fcn_head"), r"choose one of \[(.+)\]"),
        (dict(backbone="resnxt"), r"choose one of \[(.+)\]"),
        (dict(output_stride=32), r"must be (8) or 16"),
        (dict(output_stride=32), r"must be 8 or (16)"),
    ],
)
def test_every_segmentation_choice_the_message_offers_builds(args, pattern):
    kwargs = {"head": "plain", "depth": 18, "num_classes": 3, **args}
    with pytest.raises(ValueError) as raised:
        segmentation_net(**kwargs)
    (key,) = args
    for choice in _suggested(_message(raised), pattern):
        net = segmentation_net(**{**kwargs, key: int(choice) if key == "output_stride" else choice}).eval()
        with torch.no_grad():
            assert net(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)


@pytest.mark.parametrize(
    "params, value",
    [
        (dict(backbone="pyconvresnt"), "backbone"),
        (dict(head="pspnt"), "head"),
        (dict(recipe="ade20"), "recipe"),
        (dict(amp="bf61"), "amp"),
    ],
)
def test_the_parameter_value_suggested_for_a_typo_is_accepted(params, value):
    with pytest.raises(ValueError) as raised:
        S.Params(**params)
    (suggestion,) = _suggested(_message(raised), r"did you mean '([^']+)'\?$")
    assert getattr(S.Params(**{value: suggestion}), value) == suggestion


def test_a_depth_the_message_lists_is_accepted():
    with pytest.raises(ValueError) as raised:
        C.Params(arch="pyconvhgresnet", depth=18)
    depths = _suggested(_message(raised), r"^depth must be one of ([\d, ]+) for arch")
    for depth in depths:
        assert C.Params(arch="pyconvhgresnet", depth=int(depth)).model_name == f"pyconvhgresnet{depth}"


TINY_BENCH = BenchSettings(batch=2, size=32, modes=("infer",), repeats=1, warmup=0, iters=1, num_classes=4)


def test_the_torchvision_model_suggested_for_a_typo_is_timed():
    with pytest.raises(ValueError) as raised:
        make_candidate("tv:resnet1B", TINY_BENCH)
    suggested = _suggested(_message(raised), r"did you mean ([^?]+)\?")
    assert "tv:resnet18" in suggested and all(s[3:] in torchvision.models.list_models() for s in suggested)
    (row,) = run_bench(["tv:resnet18"], TINY_BENCH, log=lambda _: None)
    assert row["model"] == "tv:resnet18" and row["latency_s"] > 0


@pytest.mark.parametrize("settings", [dict(amp="fp32"), dict(modes=("eval",))])
def test_bench_settings_the_message_allows_run(settings):
    with pytest.raises(ValueError) as raised:
        run_bench(["resnet18"], dataclasses.replace(TINY_BENCH, **settings), log=lambda _: None)
    allowed = {"amp": (r"one of \[(.+)\] or None", "bf16"), "modes": (r"must be '(train)' and/or 'infer'", "train")}
    (key,) = settings
    pattern, expected = allowed[key]
    assert expected in _suggested(_message(raised), pattern)
    value = ("train",) if key == "modes" else "bf16"
    (row,) = run_bench(["resnet18"], dataclasses.replace(TINY_BENCH, **{key: value}), log=lambda _: None)
    assert row["latency_s"] > 0


# ---- the weights parameter of the tasks -----------------------------------------------------------------


def test_weights_given_as_a_file_are_evaluated_with_epochs_0(tmp_path):
    with pytest.raises(ValueError, match="epochs 0 evaluates without training and needs weights"):
        C.Params(epochs=0)
    with pytest.raises(
        FileNotFoundError, match="give a run's best.pt or last.pt, or the authors' released checkpoint$"
    ):
        C.Params(epochs=0, weights=str(tmp_path / "best.pt"))
    model = build("pyconvresnet18", num_classes=10)
    torch.save(to_official_state_dict(model), tmp_path / "pyconvresnet18.pth")  # the authors' layout
    p = C.Params(
        epochs=0,
        weights=str(tmp_path / "pyconvresnet18.pth"),
        image_size=16,
        train_subset=16,
        val_subset=16,
        batch_size=8,
        runs_dir=str(tmp_path),
        progress=False,
    )
    assert [row["kind"] for row in read_metrics(C.run(p).run_dir)] == ["eval"]
