"""COCO layout reading (as COCO writes it and as other tools do), SSD augmentation, the embedded demo
set, COCOeval metrics, unreadable images, and one tiny run."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import tv_tensors

from pyconv_core import plots
from pyconv_core.data.coco import CocoDetection, SSDRandomCrop, detection_collate
from pyconv_core.data.demo_detection import DEMO_CATEGORY_IDS, DemoDetectionConfig, make_demo_coco
from pyconv_core.engine.logging import read_metrics
from pyconv_core.tasks import detection as D

TINY = DemoDetectionConfig(num_train=24, num_val=8, image_size=64)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return make_demo_coco(tmp_path_factory.mktemp("demo") / "demo_coco", TINY)


def _write_coco(root, images, annotations, categories=({"id": 3, "name": "car"}, {"id": 9, "name": "boat"})):
    """A hand-made COCO folder: ``images`` maps file name -> (id, width, height); grey JPEGs."""
    (root / "val2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    entries = []
    for name, (image_id, width, height) in images.items():
        (root / "val2017" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (width, height), (120, 110, 100)).save(root / "val2017" / name)
        entries.append({"id": image_id, "file_name": name, "width": width, "height": height})
    data = {"images": entries, "annotations": annotations, "categories": list(categories)}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return root


def _ann(ann_id, image_id, bbox, category_id=3, iscrowd=0):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": bbox[2] * bbox[3],
        "iscrowd": iscrowd,
    }


def test_demo_set_is_coco_layout_with_boxes_exact_from_visible_pixels(demo_root):
    data = json.loads((demo_root / "annotations" / "instances_train2017.json").read_text())
    assert len(data["images"]) == TINY.num_train
    assert (demo_root / "train2017" / data["images"][0]["file_name"]).is_file()
    assert [c["id"] for c in data["categories"]] == list(DEMO_CATEGORY_IDS)
    by_image = {}
    for ann in data["annotations"]:
        visible = mask_utils.decode(ann["segmentation"]).astype(bool)
        ys, xs = np.nonzero(visible)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        assert ann["area"] == visible.sum()
        by_image.setdefault(ann["image_id"], []).append(visible)
    for masks in by_image.values():  # occlusion: a pixel is visible in one item at most
        assert np.stack(masks).sum(0).max() <= 1
    assert sum(len(m) for m in by_image.values()) > TINY.num_train


def test_demo_set_is_reused_or_regenerated_by_config(demo_root, tmp_path):
    stamp = (demo_root / "val2017" / "000000000001.jpg").stat().st_mtime_ns
    assert make_demo_coco(demo_root, TINY) == demo_root
    assert (demo_root / "val2017" / "000000000001.jpg").stat().st_mtime_ns == stamp
    other = make_demo_coco(tmp_path / "d", DemoDetectionConfig(num_train=3, num_val=2, image_size=48, seed=1))
    assert len(list((other / "train2017").iterdir())) == 3
    make_demo_coco(tmp_path / "d", DemoDetectionConfig(num_train=4, num_val=2, image_size=48, seed=1))
    assert len(list((other / "train2017").iterdir())) == 4


def test_dataset_maps_categories_and_normalizes_boxes(demo_root):
    val = CocoDetection(demo_root, "val2017", size=64)
    assert val.class_names[0] == "background" and len(val.class_names) == 11
    assert val.label_to_cat == dict(enumerate(DEMO_CATEGORY_IDS, start=1))
    image, target = val[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    ann = [a for a in val.coco.imgToAnns[target["image_id"]] if not a["iscrowd"]]
    x, y, w, h = ann[0]["bbox"]
    torch.testing.assert_close(target["boxes"][0], torch.tensor([x, y, x + w, y + h]) / 64)
    assert target["labels"][0] == val.cat_to_label[ann[0]["category_id"]]


def test_training_augmentation_keeps_boxes_valid(demo_root):
    train = CocoDetection(demo_root, "train2017", train=True, size=96, skip_empty=True)
    torch.manual_seed(0)
    images, targets, skipped = detection_collate([train[i % len(train)] for i in range(40)])
    assert skipped == 0
    assert images.shape == (40, 3, 96, 96)
    for t in targets:
        boxes = t["boxes"]
        assert len(boxes) == len(t["labels"]) and ((boxes >= 0) & (boxes <= 1)).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert sum(len(t["boxes"]) for t in targets) > 0


def test_random_min_iou_crop_keeps_a_box_centre_and_the_aspect_limits():
    crop = SSDRandomCrop()
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[10.0, 20, 60, 90], [70, 5, 95, 30]]), format="XYXY", canvas_size=(100, 120)
    )
    torch.manual_seed(0)
    kept = 0
    for _ in range(200):
        params = crop.make_params([boxes])
        if not params:
            continue
        kept += 1
        assert 0.5 <= params["width"] / params["height"] <= 2.0
        assert 30 <= params["width"] <= 120 and 30 <= params["height"] <= 100
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        inside = (
            (params["left"] < cx)
            & (cx < params["left"] + params["width"])
            & (params["top"] < cy)
            & (cy < params["top"] + params["height"])
        )
        assert torch.equal(inside, params["is_within_crop_area"]) and inside.any()
    assert 120 < kept < 200  # "leave as is" is one of seven options
    empty = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(100, 120))
    assert crop.make_params([empty]) == {}


def test_crowd_degenerate_missing_and_empty_images(tmp_path, caplog):
    root = _write_coco(
        tmp_path,
        {"a.jpg": (1, 80, 60), "b.jpg": (2, 80, 60), "gone.jpg": (3, 80, 60)},
        [
            _ann(1, 1, [10, 10, 20, 30]),
            _ann(2, 1, [0, 0, 80, 60], iscrowd=1),
            _ann(3, 1, [5, 5, 0, 10]),
            _ann(4, 1, [70, 50, 30, 30], category_id=9),
            _ann(5, 3, [1, 1, 5, 5]),
        ],
    )
    (root / "val2017" / "gone.jpg").unlink()
    with caplog.at_level(logging.WARNING):
        val = CocoDetection(root, "val2017", size=32)
    assert val.skipped == {"crowd_box": 1, "degenerate_box": 1, "missing_image": 1}
    assert "missing_image" in caplog.text and "degenerate_box" in caplog.text
    assert [item[0] for item in val.items] == [1, 2]
    _, target = val[0]
    torch.testing.assert_close(
        target["boxes"], torch.tensor([[10 / 80, 10 / 60, 30 / 80, 40 / 60], [70 / 80, 50 / 60, 1.0, 1.0]])
    )
    assert target["labels"].tolist() == [1, 2]  # ids 3 and 9 -> 1 and 2
    assert len(val[1][1]["boxes"]) == 0
    assert len(CocoDetection(root, "val2017", size=32, skip_empty=True)) == 1


def test_malformed_or_missing_annotation_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        CocoDetection(tmp_path, "val2017")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text('{"images": [')
    with pytest.raises(ValueError, match="instances_val2017.json is not valid JSON"):
        CocoDetection(tmp_path, "val2017")
    (tmp_path / "annotations" / "instances_val2017.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="no annotations, categories"):
        CocoDetection(tmp_path, "val2017")
    (tmp_path / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": [], "annotations": [{"id": 1, "image_id": 1}], "categories": []})
    )
    with pytest.raises(ValueError, match="annotation 1 .* bbox"):
        CocoDetection(tmp_path, "val2017")


def _perfect(dataset, shift=0.0):
    results = {}
    for image_id, _, _, _ in dataset.items:
        results[image_id] = [
            {
                "image_id": image_id,
                "category_id": a["category_id"],
                "score": 0.9,
                "bbox": [a["bbox"][0] + shift * a["bbox"][2], a["bbox"][1], *a["bbox"][2:]],
            }
            for a in dataset.coco.imgToAnns.get(image_id, [])
            if not a["iscrowd"]
        ]
    return results


def test_cocoeval_gives_100_for_perfect_and_less_for_shifted_boxes(tmp_path):
    root = _write_coco(
        tmp_path,
        {"a.jpg": (1, 200, 200), "b.jpg": (2, 200, 200)},
        [_ann(1, 1, [10, 10, 20, 30]), _ann(2, 1, [50, 40, 60, 80], category_id=9), _ann(3, 2, [20, 100, 150, 90])],
    )
    val = CocoDetection(root, "val2017", size=32)
    perfect = D.coco_metrics(val, _perfect(val))
    assert set(D.COCO_METRICS) <= set(perfect)
    for key in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100"):
        assert perfect[key] == pytest.approx(100.0), key
    assert perfect["APs"] == pytest.approx(100.0) and perfect["APl"] == pytest.approx(100.0)
    shifted = D.coco_metrics(val, _perfect(val, shift=0.3))  # IoU 0.7/1.3 = 0.54: counts at 0.5 only
    assert shifted["AP50"] == pytest.approx(100.0) and shifted["AP75"] == 0.0 and shifted["AP"] < 20
    assert D.coco_metrics(val, {1: [], 2: []})["AP"] == 0.0


def test_tiny_run_records_the_twelve_coco_numbers(demo_root, tmp_path):
    p = D.Params(
        depth=18,
        image_size=64,
        epochs=1,
        batch_size=8,
        demo_dir=str(demo_root),
        demo_train=TINY.num_train,
        demo_val=TINY.num_val,
        demo_image_size=TINY.image_size,
        runs_dir=str(tmp_path),
        run_name="tiny",
    )
    result = D.run(p)
    rows = read_metrics(result.run_dir)
    train, evals = [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "eval"]
    assert np.isfinite(train[0]["train_loss"]) and train[0]["num_positives"] > 0
    assert set(D.COCO_METRICS) <= set(evals[0]) and evals[0]["num_images"] == TINY.num_val
    table = D.paper_table(evals[0], "pyconvssd50")
    assert list(table.index) == list(D.COCO_METRICS) and table.loc["AP", "paper pyconvssd50"] == 29.16


# ---- COCO files as other tools write them ----------------------------------------------------


def _edit_json(root, edit):
    """Apply ``edit`` to the parsed instances_val2017.json of ``root`` and write it back; its path."""
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def _cut(path):
    """Truncate a real image file to half its bytes, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_labelme_export_with_folders_and_without_area_iscrowd_or_id_is_read_and_evaluated(tmp_path, caplog):
    root = _write_coco(
        tmp_path,
        {"JPEGImages/a.jpg": (1, 200, 200), "JPEGImages/b.jpg": (2, 200, 200), "JPEGImages/gone.jpg": (3, 200, 200)},
        [
            {"image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 30]},
            {"image_id": 1, "category_id": 9, "bbox": [50, 40, 60, 80]},
            {"image_id": 2, "category_id": 3, "bbox": [20, 100, 150, 90]},
        ],
    )
    (root / "val2017" / "JPEGImages" / "gone.jpg").unlink()
    _edit_json(root, lambda d: d["images"][1].update(file_name="JPEGImages\\b.jpg"))  # as labelme writes on Windows
    with caplog.at_level(logging.WARNING):
        val = CocoDetection(root, "val2017", size=32)
    assert [item[:2] for item in val.items] == [(1, "JPEGImages/a.jpg"), (2, "JPEGImages/b.jpg")]
    assert caplog.text.count("annotations have no area") == 1  # once per file, not per annotation
    assert "3 of 3 annotations have no iscrowd, taken as 0" in caplog.text
    assert str(root / "val2017" / "JPEGImages" / "gone.jpg") in caplog.text  # the missing file is named
    assert sorted(a["id"] for a in val.coco.dataset["annotations"]) == [1, 2, 3]
    assert val.coco.anns[3]["area"] == 150 * 90
    perfect = D.coco_metrics(val, _perfect(val))  # COCOeval reads area and iscrowd of every annotation
    assert perfect["AP"] == pytest.approx(100.0) and perfect["APs"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    "section, index, key, fix",
    [
        ("images", 1, "height", "its width and height in pixels"),
        ("images", 0, "file_name", "its file_name relative to the split folder"),
        ("annotations", 1, "bbox", "a bbox [x, y, width, height] in pixels"),
        ("annotations", 0, "image_id", "the image_id of its image"),
        ("annotations", 1, "category_id", "a category_id listed in categories"),
        ("categories", 1, "name", "a category needs a unique id and a name"),
        ("categories", 0, "id", "a category needs a unique id and a name"),
    ],
)
def test_an_entry_without_a_required_field_is_named_with_its_file_and_the_fix(tmp_path, section, index, key, fix):
    root = _write_coco(
        tmp_path,
        {"a.jpg": (1, 80, 60), "b.jpg": (2, 80, 60)},
        [_ann(1, 1, [1, 1, 5, 5]), _ann(2, 2, [1, 1, 5, 5], category_id=9)],
    )
    path = _edit_json(root, lambda d: d[section][index].pop(key))
    with pytest.raises(ValueError) as raised:
        CocoDetection(root, "val2017")
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and f"(entry {index} of {section}) lacks {key};" in message
    assert fix in message and message.endswith(
        "Fix the entry, or remove it and the annotations of its category."
        if section == "categories"
        else "Fix or remove the entry."
    )


def test_malformed_values_duplicate_ids_and_unlisted_categories_are_errors_before_training(tmp_path):
    root = _write_coco(
        tmp_path,
        {"a.jpg": (1, 80, 60), "b.jpg": (2, 80, 60)},
        [_ann(1, 1, [10, 10, 20, 30]), _ann(7, 2, [5, 5, 20, 20], category_id=42)],
    )
    with pytest.raises(
        ValueError,
        match=r"instances_val2017.json: annotation 7 \(entry 1 of annotations\) has "
        r"category_id 42, which categories does not list \(its ids: \[3, 9\]\)",
    ):
        CocoDetection(root, "val2017")
    _edit_json(root, lambda d: d["annotations"][1].update(category_id=9, bbox=["5", 5, 20, 20]))
    with pytest.raises(ValueError, match=r"annotation 7 \(entry 1 of annotations\) has bbox \['5', 5, 20, 20\]"):
        CocoDetection(root, "val2017")
    _edit_json(root, lambda d: (d["annotations"][1].update(bbox=[5, 5, 20, 20]), d["images"][1].update(id=1)))
    with pytest.raises(ValueError, match=r"image 1 \(entry 0 of images\) shares its id with 1 other entries"):
        CocoDetection(root, "val2017")


def test_the_decoded_image_size_wins_over_the_json_and_a_disagreement_is_logged_once(tmp_path, caplog):
    root = _write_coco(
        tmp_path,
        {"a.jpg": (1, 160, 120), "b.jpg": (2, 160, 120)},
        [_ann(1, 1, [100, 80, 40, 30]), _ann(2, 2, [10, 10, 170, 100])],
    )
    _edit_json(root, lambda d: [image.update(width=80, height=60) for image in d["images"]])  # a resized export
    val = CocoDetection(root, "val2017", size=32)
    with caplog.at_level(logging.WARNING):
        (_, first), (_, second) = val[0], val[1]
    assert first["orig_size"] == second["orig_size"] == (120, 160)
    torch.testing.assert_close(first["boxes"], torch.tensor([[100 / 160, 80 / 120, 140 / 160, 110 / 120]]))
    torch.testing.assert_close(second["boxes"], torch.tensor([[10 / 160, 10 / 120, 1.0, 110 / 120]]))  # clipped
    assert caplog.text.count("boxes are clipped to the image's own size") == 1
    assert "says image 1 is 80x60" in caplog.text and "a.jpg is 160x120" in caplog.text


def test_train_and_val_files_must_list_the_same_categories(demo_root, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(demo_root, root)
    _edit_json(root, lambda d: d["categories"][0].update(name="renamed"))
    p = D.Params(data_dir=str(root), image_size=64)
    with pytest.raises(
        ValueError,
        match=r"instances_val2017.json and .*instances_train2017.json list different "
        r"categories .*'renamed'",
    ):
        D.datasets(p)


def test_truncated_images_are_skipped_counted_and_keep_their_place(demo_root, tmp_path, caplog):
    root = tmp_path / "coco"
    shutil.copytree(demo_root, root)
    _cut(root / "train2017" / "000000000005.jpg")
    _cut(root / "val2017" / "000000000002.jpg")
    train_size = len(CocoDetection(root, "train2017", skip_empty=True))
    p = D.Params(
        arch="ssd",
        depth=18,
        image_size=64,
        epochs=1,
        batch_size=train_size,  # one step sees every image
        data_dir=str(root),
        runs_dir=str(tmp_path / "runs"),
        run_name="cut",
    )
    result = D.run(p)  # the epoch and its evaluation finish
    train, evals = read_metrics(result.run_dir, "train"), read_metrics(result.run_dir, "eval")
    assert train[0]["num_skipped"] == 1 and np.isfinite(train[0]["train_loss"])
    assert evals[0]["num_skipped"] == 1 and evals[0]["num_images"] == TINY.num_val - 1

    caplog.clear()
    val = CocoDetection(root, "val2017", size=64)
    bad = [name for _, name, _, _ in val.items].index("000000000002.jpg")
    with caplog.at_level(logging.WARNING):
        images, targets, skipped = detection_collate([val[i] for i in range(4)])
        samples = D.predict(result.model, val, [bad - 1, bad, bad + 1])
    assert skipped == 1 and len(images) == len(targets) == 3
    assert [t["image_id"] for t in targets] == [val.items[i][0] for i in range(4) if i != bad]
    assert caplog.text.count(str(root / "val2017" / "000000000002.jpg")) == 1  # logged once, by path
    assert [s["index"] for s in samples] == [bad - 1, bad, bad + 1] and samples[1]["image"] is None
    assert [s["name"] for s in samples] == [val.items[i][1] for i in (bad - 1, bad, bad + 1)]
    assert torch.equal(samples[2]["truth"]["labels"], val.items[bad + 1][3])
    titles = [ax.get_title() for ax in plots.show_detections(samples, val.class_names).axes]
    assert titles[:5] == [
        f"{val.items[bad - 1][1]}: ground truth",
        "predicted",
        "000000000002.jpg: unreadable, skipped",
        "",
        f"{val.items[bad + 1][1]}: ground truth",
    ]


def test_an_image_over_the_pixel_limit_is_skipped_and_counted(tmp_path, monkeypatch, caplog):
    root = _write_coco(
        tmp_path,
        {"a.jpg": (1, 30, 30), "huge.jpg": (2, 80, 80)},
        [_ann(1, 1, [2, 2, 10, 10]), _ann(2, 2, [2, 2, 10, 10])],
    )
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    val = CocoDetection(root, "val2017", size=32)
    with caplog.at_level(logging.WARNING):
        images, targets, skipped = detection_collate([val[0], val[1]])
    assert skipped == 1 and [t["image_id"] for t in targets] == [1]
    assert "huge.jpg" in caplog.text and "MAX_IMAGE_PIXELS" in caplog.text
