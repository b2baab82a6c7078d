"""Segmentation: metrics on crafted masks, sliding-window inference, ADE20K reading and
augmentation, the demo set, the dilated backbone, the four heads, paper figures, and a short fit."""

import json
import logging

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Subset

from pyconv_core import build, list_models, plots
from pyconv_core.data.ade20k import (
    ADE20K,
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    IGNORE_INDEX,
    TrainTransform,
    colorize,
    denormalize,
    palette_for,
    read_class_names,
)
from pyconv_core.data.demo_segmentation import DEMO_CLASSES, make_demo_ade20k
from pyconv_core.engine.checkpoint import load_checkpoint, save_atomic
from pyconv_core.engine.trainer import TrainConfig, fit
from pyconv_core.models.resnet import ResNet
from pyconv_core.paper import PAPER
from pyconv_core.profile import profile_rows
from pyconv_core.tasks.segmentation import (
    NEW_MODULES,
    Params,
    SegmentationTask,
    class_iou_table,
    collate,
    confusion_matrix,
    datasets,
    predict,
    scores,
    segmentation_sample,
    train_config,
)

# ---- metrics on crafted masks ----------------------------------------------------------------


def _scores(pred, target, num_classes=3):
    return scores(confusion_matrix(torch.tensor(pred), torch.tensor(target), num_classes))


def test_perfect_prediction_scores_100():
    target = [[0, 1, 2], [2, 1, 0]]
    s = _scores(target, target)
    assert s["miou"] == pytest.approx(100) and s["pixel_acc"] == pytest.approx(100)
    assert s["mean_acc"] == pytest.approx(100)


def test_known_partial_case():
    # class 0: I=1, U=2 -> 1/2; class 1: I=2, U=3 -> 2/3; class 2 absent everywhere -> not averaged
    s = _scores([[0, 1], [1, 1]], [[0, 0], [1, 1]])
    assert s["miou"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert s["pixel_acc"] == pytest.approx(75)
    assert s["mean_acc"] == pytest.approx(100 * (1 / 2 + 1) / 2)
    assert torch.isnan(s["iou"][2])


def test_predicting_an_absent_class_counts_as_zero_iou():
    s = _scores([[2, 2], [1, 1]], [[0, 0], [1, 1]])
    assert s["iou"].tolist()[:3] == [0.0, 1.0, 0.0]
    assert s["miou"] == pytest.approx(100 / 3)


def test_ignored_pixels_do_not_count():
    s = _scores([[0, 2], [1, 2]], [[0, IGNORE_INDEX], [1, IGNORE_INDEX]])
    assert s["miou"] == pytest.approx(100) and s["pixel_acc"] == pytest.approx(100)


def test_confusion_accumulates_over_batches_like_one_batch():
    g = torch.Generator().manual_seed(0)
    preds = [torch.randint(0, 4, (5, 7), generator=g) for _ in range(3)]
    targets = [torch.randint(0, 4, (5, 7), generator=g) for _ in range(3)]
    summed = sum(confusion_matrix(p, t, 4) for p, t in zip(preds, targets))
    assert torch.equal(summed, confusion_matrix(torch.cat(preds), torch.cat(targets), 4))
    assert summed.sum() == 3 * 35


def test_label_outside_the_classes_is_refused():
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix(torch.zeros(2, 2), torch.tensor([[0, 7], [1, 1]]), 3)


def test_class_iou_table_names_every_class():
    rows = class_iou_table(confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 3), ["a", "b", "c"])
    assert [r["class"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["iou"] == pytest.approx(50) and rows[1]["iou"] == pytest.approx(50) and rows[2]["iou"] is None


# ---- sliding-window inference ----------------------------------------------------------------


def test_sliding_window_equals_a_whole_image_pass_for_a_pointwise_model():
    """A 1x1 conv sees no context, so windows, padding and flips must not change its output."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 1).eval()
    image = torch.randn(3, 50, 71)
    expected = model(image[None])[0].softmax(0)
    for flip in (False, True):
        probs = predict(model, image, 4, crop=33, base_size=0, flip=flip)
        torch.testing.assert_close(probs, expected.detach(), rtol=1e-5, atol=1e-5)
    small = torch.randn(3, 20, 25)  # smaller than the crop: padded
    torch.testing.assert_close(
        predict(model, small, 4, crop=33, base_size=0), model(small[None])[0].softmax(0).detach(), rtol=1e-5, atol=1e-5
    )


def test_multi_scale_prediction_keeps_the_image_size():
    model = nn.Conv2d(3, 4, 1).eval()
    probs = predict(model, torch.randn(3, 40, 30), 4, crop=33, base_size=48, scales=(0.5, 1.0, 1.75), flip=True)
    assert probs.shape == (4, 40, 30)
    torch.testing.assert_close(probs.sum(0), torch.ones(40, 30))


# ---- ADE20K layout ---------------------------------------------------------------------------


def _write_ade(root, sizes=((40, 30), (36, 36)), split="training"):
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        name = f"ADE_{split[:5]}_{i + 1:08d}"
        Image.fromarray(np.full((h, w, 3), 100 + i, np.uint8)).save(root / "images" / split / f"{name}.jpg")
        label = (np.arange(w)[None, :].repeat(h, 0) % 4).astype(np.uint8)  # values 0..3; 0 = other
        Image.fromarray(label).save(root / "annotations" / split / f"{name}.png")
    return root


def test_ade20k_reads_the_release_layout_and_maps_labels(tmp_path):
    root = _write_ade(tmp_path / "ADEChallengeData2016")
    ds = ADE20K(tmp_path)  # the parent folder works too
    assert len(ds) == 2 and len(ds.classes) == 150 and ds.classes[0] == "wall"
    image, mask = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32 and mask.dtype == torch.int64
    assert mask[0, :4].tolist() == [IGNORE_INDEX, 0, 1, 2]
    (root / "objectInfo150.txt").write_text(
        "Idx\tRatio\tTrain\tVal\tName\n2\t0.1\t1\t1\tbuilding, edifice\n1\t0.2\t1\t1\twall\n"
    )
    assert read_class_names(root) == ("wall", "building")


def test_missing_mask_is_named(tmp_path):
    root = _write_ade(tmp_path)
    (root / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_train_00000002.png"):
        ADE20K(root)


def test_mismatched_sizes_and_colour_masks_are_named(tmp_path):
    root = _write_ade(tmp_path)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "annotations" / "training" / "ADE_train_00000001.png")
    Image.fromarray(np.zeros((36, 36, 3), np.uint8)).save(root / "annotations" / "training" / "ADE_train_00000002.png")
    ds = ADE20K(root)
    with pytest.raises(ValueError, match="ADE_train_00000001.jpg is 40x30 but its mask .*00000001.png is 10x10"):
        ds[0]
    with pytest.raises(ValueError, match="ADE_train_00000002.png is a RGB image"):
        ds[1]


def test_train_transform_moves_image_and_mask_together():
    """Left half label 1 and dark, right half label 2 and bright: after scale, rotation, flip and
    crop, each label must still sit on its own colour; padding is ignored."""
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    image[:, :, 30:] = 250
    mask = torch.ones(40, 60, dtype=torch.uint8)
    mask[:, 30:] = 2
    torch.manual_seed(0)
    transform = TrainTransform(crop_size=57, scale=(0.5, 2.0), rotate=(-10, 10))
    for _ in range(12):
        x, y = transform(image, mask)
        assert x.shape == (3, 57, 57) and y.shape == (57, 57) and set(y.unique().tolist()) <= {1, 2, IGNORE_INDEX}
        grey = torch.from_numpy(denormalize(x)).float().mean(-1)
        if (y == 1).any():
            assert grey[y == 1].median() < 60
        if (y == 2).any():
            assert grey[y == 2].median() > 190
    plain = TrainTransform(crop_size=60, scale=(1, 1), rotate=(0, 0))  # only the flip is random
    firsts = {int(plain(image, mask)[1][30, 0]) for _ in range(12)}
    assert firsts == {1, 2}
    x, y = TrainTransform(crop_size=57, scale=(0.5, 0.5), rotate=(0, 0), flip=False)(image, mask)
    assert (y == IGNORE_INDEX).sum() == 57 * 57 - 20 * 30  # a 30x20 image padded to 57x57
    assert torch.allclose(x[:, y == IGNORE_INDEX], torch.zeros(1))  # padded with the mean


def test_colorize_uses_the_palette_and_blacks_out_ignored_pixels():
    rgb = colorize(torch.tensor([[0, 1], [IGNORE_INDEX, 0]]))
    assert rgb.shape == (2, 2, 3) and rgb[0, 0].tolist() == [120, 120, 120] and rgb[1, 0].tolist() == [0, 0, 0]
    assert np.array_equal(palette_for(ADE20K_CLASSES), ADE20K_PALETTE)
    demo = palette_for(DEMO_CLASSES)
    assert demo[DEMO_CLASSES.index("sky")].tolist() == ADE20K_PALETTE[ADE20K_CLASSES.index("sky")].tolist()
    assert len({tuple(c) for c in demo.tolist()}) == len(DEMO_CLASSES)


# ---- demo set ----------------------------------------------------------------------------------


def test_demo_set_is_written_in_the_ade20k_layout_and_reused(tmp_path):
    root = make_demo_ade20k(tmp_path, num_train=6, num_val=3)
    train, val = ADE20K(root, "training"), ADE20K(root, "validation")
    assert (len(train), len(val)) == (6, 3) and train.classes == DEMO_CLASSES
    labels = torch.cat([train[i][1].flatten() for i in range(6)]).unique().tolist()
    assert IGNORE_INDEX in labels and max(set(labels) - {IGNORE_INDEX}) < len(DEMO_CLASSES)
    assert any(v >= 4 for v in labels if v != IGNORE_INDEX)  # Fashion-MNIST items are visible
    stamp = (root / "images" / "training" / "ADE_train_00000001.jpg").stat().st_mtime_ns
    assert make_demo_ade20k(tmp_path, num_train=6, num_val=3) == root
    assert (root / "images" / "training" / "ADE_train_00000001.jpg").stat().st_mtime_ns == stamp
    make_demo_ade20k(tmp_path, num_train=4, num_val=3)
    assert len(ADE20K(root, "training")) == 4
    assert json.loads((tmp_path / "demo.json").read_text())["num_train"] == 4


def test_demo_set_size_and_folder_come_from_the_parameters(tmp_path):
    train, val, classes = datasets(Params(demo_dir=str(tmp_path / "demo"), demo_train=5, demo_val=2))
    assert (len(train), len(val), classes) == (5, 2, DEMO_CLASSES)
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["num_train"] == 5
    with pytest.raises(ValueError, match="demo_train must be >= 1"):
        Params(demo_train=0).check()


# ---- models --------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_stride, sizes", [(8, [17, 9, 9, 9]), (16, [17, 9, 5, 5])])
@pytest.mark.parametrize("family", ["resnet", "pyconvresnet"])
def test_dilated_backbone_stops_downsampling_at_the_output_stride(family, output_stride, sizes):
    net = ResNet(family, 50, num_classes=0, output_stride=output_stride).eval()
    with torch.no_grad():
        seen = [x.shape[-1] for x in net.features(torch.randn(1, 3, 65, 65)).values()]
    assert seen == sizes
    stage4 = net.layer4[0]
    assert stage4.conv2.levels[0].dilation == ((4, 4) if output_stride == 8 else (2, 2))
    assert stage4.conv2.levels[0].stride == (1, 1)
    if family == "pyconvresnet":
        pool = stage4.downsample[0]
        assert isinstance(pool, nn.MaxPool2d) and (pool.kernel_size, pool.stride, pool.padding) == (3, 1, 1)
        if output_stride == 8:
            level = net.layer3[1].conv2.levels[1]  # PyConv2 level 5x5 in stage 3, dilation 2
            assert level.kernel_size == (5, 5) and level.dilation == (2, 2) and level.padding == (4, 4)


def test_output_stride_is_validated():
    with pytest.raises(ValueError, match="output_stride"):
        ResNet("resnet", 50, output_stride=4)
    with pytest.raises(ValueError, match="output_stride"):
        build("pspnet50", output_stride=32)
    with pytest.raises(ValueError, match="unknown backbone"):
        build("fcn50", backbone="vgg")


@pytest.mark.parametrize("name", [n for n in list_models("segmentation") if n.endswith("18")])
def test_every_head_gives_logits_at_the_input_size(name):
    model = build(name, num_classes=6, output_stride=8).eval()
    x = torch.randn(2, 3, 41, 49)
    with torch.no_grad():
        assert model(x).shape == (2, 6, 41, 49)
    out = model.train()(x)
    assert set(out) == {"out", "aux"} and out["aux"].shape == (2, 6, 41, 49)


def test_backbone_starts_from_imagenet_weights():
    theirs = torchvision.models.resnet18()
    model = build("fcn18", num_classes=3, backbone="resnet", backbone_weights=theirs.state_dict())
    assert torch.equal(model.backbone.layer4[1].conv2.levels[0].weight, theirs.layer4[1].conv2.weight)
    assert isinstance(model.backbone.fc, nn.Identity)
    assert not any(k.startswith("backbone.fc") for k in model.state_dict())


def test_every_registered_name_exists():
    names = set(list_models("segmentation"))
    for head in ("pyconvsegnet", "pspnet", "fcn"):
        assert {f"{head}50", f"{head}101", f"{head}152"} <= names
    assert {"deeplabv3_50", "deeplabv3_101", "deeplabv3_152"} <= names


@pytest.fixture(scope="module")
def paper_rows():
    return profile_rows([n for n in list_models("segmentation") if n in PAPER])


def test_params_and_gflops_match_s_table_6_at_both_output_strides(paper_rows):
    assert {(r["model"], r["output_stride"]) for r in paper_rows} == {
        (n, s) for n in ("pyconvsegnet50", "pspnet50", "deeplabv3_50", "fcn50") for s in (8, 16)
    }
    for r in paper_rows:
        assert r["input"] == (473, 473)
        assert abs(r["params_diff"]) <= 0.01, r
        assert abs(r["gflops_diff"]) <= 0.03, r


def test_the_profiler_counts_the_aux_head_as_s_table_6(paper_rows):
    [os8] = [r for r in paper_rows if (r["model"], r["output_stride"]) == ("pyconvsegnet50", 8)]
    [without_aux] = profile_rows(["pyconvsegnet50"], input_shape=(3, 473, 473), num_classes=150, output_stride=8)
    assert os8["params"] == without_aux["params"] and os8["gflops"] > without_aux["gflops"]


# ---- task and trainer ----------------------------------------------------------------------------


def _shard_confusion(rank, world, init_file, out):
    """One process of a gloo group: the confusion matrix of its shard, summed over the group."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    images, masks, model = _eval_fixture()
    shard = [(images[i], masks[i]) for i in range(rank, len(images), world)]
    confusion, _ = SegmentationTask(4, crop=33, base_size=0).confusion(model, [collate(shard)], torch.device("cpu"))
    if rank == 0:
        torch.save(confusion, out)
    torch.distributed.destroy_process_group()


def _eval_fixture():
    g = torch.Generator().manual_seed(0)
    model = nn.Conv2d(3, 4, 1).eval()
    with torch.no_grad():
        model.weight.copy_(torch.randn(4, 3, 1, 1, generator=g))
        model.bias.copy_(torch.randn(4, generator=g))
    images = [torch.randn(3, 20 + i, 30, generator=g) for i in range(5)]
    masks = [torch.randint(0, 4, (20 + i, 30), generator=g) for i in range(5)]
    return images, masks, model


def test_confusion_is_summed_over_processes(tmp_path):
    torch.multiprocessing.spawn(_shard_confusion, args=(2, tmp_path / "init", tmp_path / "conf.pt"), nprocs=2)
    images, masks, model = _eval_fixture()
    single, skipped = SegmentationTask(4, crop=33, base_size=0).confusion(
        model, [collate(list(zip(images, masks)))], torch.device("cpu")
    )
    assert torch.equal(torch.load(tmp_path / "conf.pt"), single) and single.sum() == sum(m.numel() for m in masks)
    assert skipped == 0


def test_train_step_adds_the_auxiliary_loss_at_weight_0_4():
    torch.manual_seed(0)
    model = build("fcn18", num_classes=4, output_stride=16).train()
    images, masks = [torch.randn(3, 33, 33) for _ in range(2)], [torch.randint(0, 4, (33, 33)) for _ in range(2)]
    masks[0][:5] = IGNORE_INDEX
    task = SegmentationTask(4)
    torch.manual_seed(1)
    losses = task.train_step(model, collate(list(zip(images, masks))), torch.device("cpu"))
    assert torch.isclose(losses["loss"], losses["main_loss"] + 0.4 * losses["aux_loss"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(task.train_step(model, (images, masks, 0), torch.device("cpu"))["loss"])


def test_short_fit_on_the_demo_layout_records_miou(tmp_path):
    root = make_demo_ade20k(tmp_path / "demo", num_train=8, num_val=3)
    train = ADE20K(root, "training", TrainTransform(crop_size=33, scale=(0.75, 1.25)))
    val = ADE20K(root, "validation")
    model = build("fcn18", num_classes=len(train.classes), output_stride=16)
    task = SegmentationTask(len(train.classes), crop=73, base_size=0)
    result = fit(
        model,
        task,
        train,
        val,
        TrainConfig(
            run_name="seg",
            epochs=1,
            batch_size=4,
            lr=0.01,
            lr_reference_batch=16,
            schedule="poly",
            lr_multipliers={prefix: 10.0 for prefix in NEW_MODULES},
            runs_dir=str(tmp_path / "runs"),
            progress=False,
        ),
    )
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if row["kind"] != "step"]  # the loss-curve rows (tests/test_curves.py)
    assert rows[0]["kind"] == "train" and rows[0]["train_aux_loss"] > 0
    assert rows[1]["kind"] == "eval" and 0 <= rows[1]["miou"] <= 100 and 0 <= rows[1]["pixel_acc"] <= 100
    backbone, new = load_checkpoint(result.run_dir / "last.pt")["optimizer"]["param_groups"]
    assert len(new["params"]) == sum(1 for name, _ in model.named_parameters() if not name.startswith("backbone."))
    assert new["lr"] == pytest.approx(10 * backbone["lr"]) and backbone["lr"] == pytest.approx(rows[0]["lr"])


def test_ade20k_recipe_trains_the_new_modules_at_10x_like_the_authors():
    assert train_config(Params(recipe="ade20k")).lr_multipliers == {"head.": 10.0, "classifier.": 10.0, "aux.": 10.0}
    assert train_config(Params(recipe="demo")).lr_multipliers == {}
    assert set(train_config(Params(recipe="demo", head_lr_scale=5)).lr_multipliers.values()) == {5.0}


def test_backbone_starts_from_a_workbook_classification_checkpoint(tmp_path):
    classifier = build("pyconvresnet18", num_classes=10)  # a Fashion-MNIST run's best.pt: own layout, 10 classes
    save_atomic({"model": classifier.state_dict(), "epoch": 3}, tmp_path / "best.pt")
    model = build("pyconvsegnet18", num_classes=3, backbone="pyconvresnet", backbone_weights=str(tmp_path / "best.pt"))
    theirs, ours = classifier.state_dict(), model.backbone.state_dict()
    shared = [k for k in theirs if ".levels.1." in k and not k.startswith("fc.")]
    assert shared and all(torch.equal(ours[k], theirs[k]) for k in shared)
    with pytest.raises(ValueError, match=r"best\.pt"):  # the error names the file
        build("pyconvsegnet50", num_classes=3, backbone="pyconvresnet", backbone_weights=str(tmp_path / "best.pt"))


# ---- unreadable images and masks -------------------------------------------------------------


def _cut(path):
    """Truncate a real image file to half its bytes, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_image_or_mask_is_skipped_logged_once_counted_and_keeps_its_place(tmp_path, caplog):
    root = _write_ade(tmp_path, sizes=((40, 30), (36, 36), (30, 30), (33, 20)), split="validation")
    _cut(root / "images" / "validation" / "ADE_valid_00000002.jpg")
    _cut(root / "annotations" / "validation" / "ADE_valid_00000003.png")
    ds = ADE20K(root, "validation")
    with caplog.at_level(logging.WARNING):
        assert ds[1] is None and ds[2] is None and ds[1] is None
    assert caplog.text.count("ADE_valid_00000002.jpg") == 1 and caplog.text.count("ADE_valid_00000003.png") == 1
    images, masks, skipped = collate([ds[i] for i in range(4)])
    assert skipped == 2 and [tuple(m.shape) for m in masks] == [(30, 40), (20, 33)]

    torch.manual_seed(0)
    model, task = nn.Conv2d(3, 150, 1).eval(), SegmentationTask(150, crop=33, base_size=0)
    metrics = task.evaluate(model, DataLoader(ds, batch_size=2, collate_fn=collate), torch.device("cpu"))
    readable = task.evaluate(
        model, DataLoader(Subset(ds, [0, 3]), batch_size=2, collate_fn=collate), torch.device("cpu")
    )
    assert metrics == {**readable, "num_skipped": 2.0} and readable["num_skipped"] == 0.0

    samples = [segmentation_sample(ds, i, {"conv": model}, task) for i in range(4)]
    assert [s["name"] for s in samples] == [f"ADE_valid_{i:08d}.jpg" for i in range(1, 5)]
    assert samples[1]["image"] is None and samples[2]["image"] is None
    assert samples[3]["image"].shape == (20, 33, 3) and samples[3]["truth"].shape == (20, 33)
    axes = plots.show_segmentation(samples, ds.palette, ds.classes).axes
    assert [ax.get_title() for ax in axes[3:10:3]] == [
        "ADE_valid_00000002.jpg: unreadable, skipped",
        "ADE_valid_00000003.jpg: unreadable, skipped",
        "image",
    ]


def test_an_epoch_with_truncated_files_runs_and_records_the_count(tmp_path):
    root = make_demo_ade20k(tmp_path / "demo", num_train=8, num_val=3)
    _cut(sorted((root / "images" / "training").iterdir())[2])
    _cut(sorted((root / "annotations" / "validation").iterdir())[1])
    train = ADE20K(root, "training", TrainTransform(crop_size=33, scale=(0.75, 1.25)))
    val = ADE20K(root, "validation")
    model = build("fcn18", num_classes=len(train.classes), output_stride=16)
    task = SegmentationTask(len(train.classes), crop=73, base_size=0)
    result = fit(
        model,
        task,
        train,
        val,
        TrainConfig(
            run_name="cut",
            epochs=1,
            batch_size=4,
            lr=0.01,
            lr_reference_batch=16,
            schedule="poly",
            pyconv_plan="naive",
            runs_dir=str(tmp_path / "runs"),
            progress=False,
        ),
    )
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_row, eval_row = [r for r in rows if r["kind"] == "train"][0], [r for r in rows if r["kind"] == "eval"][0]
    assert train_row["num_skipped"] == 1 and np.isfinite(train_row["train_loss"])
    assert eval_row["num_skipped"] == 1 and 0 <= eval_row["miou"] <= 100


def test_an_image_over_the_pixel_limit_is_skipped_logged_and_counted(tmp_path, monkeypatch, caplog):
    root = _write_ade(tmp_path, sizes=((40, 30), (90, 90)), split="validation")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 1200 pixels pass, 8100 do not
    ds = ADE20K(root, "validation")
    with caplog.at_level(logging.WARNING):
        images, masks, skipped = collate([ds[0], ds[1]])
    assert skipped == 1 and [tuple(m.shape) for m in masks] == [(30, 40)]
    assert "ADE_valid_00000002.jpg" in caplog.text and "MAX_IMAGE_PIXELS" in caplog.text
