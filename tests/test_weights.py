"""Starting from, or only evaluating, any checkpoint of the whole model (the ``weights`` parameter) in
every task: a run's last.pt evaluated with epochs 0 gives exactly the run's final metrics, into its own
run folder; the authors' layout (classification, PyConvSegNet) evaluates; wrong input is named."""

import dataclasses

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from pyconv_core import CheckpointMismatchError, build, to_official_state_dict
from pyconv_core.data.ade20k import ADE20K
from pyconv_core.data.demo_detection import DemoDetectionConfig, make_demo_coco
from pyconv_core.data.demo_segmentation import make_demo_ade20k
from pyconv_core.engine import trainer
from pyconv_core.engine.logging import read_metrics
from pyconv_core.plots import plot_curves
from pyconv_core.run import load_run_model, parse_params
from pyconv_core.tasks import classification, detection, segmentation, video
from tests.official_reference import randomize_bn

TINY_CLASSIFICATION = dict(
    arch="pyconvresnet", depth=18, image_size=16, train_subset=128, val_subset=64, batch_size=32, progress=False
)


def _final_eval(run_dir) -> dict:
    return {k: v for k, v in read_metrics(run_dir, "eval")[-1].items() if k != "epoch"}


def _evaluate_checkpoint_of_a_run(module, **params):
    """Train one epoch, then evaluate its last.pt with epochs 0 under the default run name: both run folders."""
    trained = module.run(module.Params(epochs=1, **params)).run_dir
    evaluated = module.run(module.Params(epochs=0, weights=str(trained / "last.pt"), **params)).run_dir
    assert evaluated.name == f"{trained.name}-eval-{trained.name}-last" and evaluated.parent == trained.parent
    assert [r["kind"] for r in read_metrics(evaluated)] == ["eval"] and read_metrics(evaluated)[0]["epoch"] == 0
    assert _final_eval(evaluated) == _final_eval(trained)
    return trained, evaluated


def test_classification_checkpoint_evaluates_to_its_runs_final_metrics(tmp_path):
    trained, evaluated = _evaluate_checkpoint_of_a_run(classification, runs_dir=str(tmp_path), **TINY_CLASSIFICATION)
    for which in ("best", "last"):  # the evaluated model is the checkpoint's, for the notebooks' later cells
        ours, theirs = load_run_model(evaluated, which).state_dict(), load_run_model(trained, "last").state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    axes = plot_curves(
        {"trained": trained, "evaluated": evaluated}, panels=(("train", "train_loss"), ("eval", "top1_err"))
    )  # no train rows: no crash
    assert [len(ax.collections) for ax in axes][1] > 0


def test_an_official_layout_classification_checkpoint_evaluates(tmp_path):
    torch.manual_seed(1)
    model = randomize_bn(build("pyconvresnet18", num_classes=10)).eval()
    path = tmp_path / "pyconvresnet18.pth"  # the authors' layout and file: DataParallel keys in a state_dict entry
    torch.save({"epoch": 90, "state_dict": {f"module.{k}": v for k, v in to_official_state_dict(model).items()}}, path)
    p = classification.Params(epochs=0, weights=str(path), runs_dir=str(tmp_path), **TINY_CLASSIFICATION)
    row = read_metrics(classification.run(p).run_dir, "eval")[0]
    _, val, _ = classification.datasets(p)
    expected = trainer.evaluate(
        model, classification.ClassificationTask(), val, classification.train_config(p), torch.device("cpu")
    )
    assert row == pytest.approx({"kind": "eval", "epoch": 0, **expected}) and row["num_samples"] == 64


def test_epochs_zero_needs_weights_and_weights_must_fit(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"epochs must be >= 1, got 0; epochs 0 evaluates without training and "
        r"needs weights",
    ):
        classification.Params(epochs=0)
    with pytest.raises(FileNotFoundError, match="weights 'nope.pt' is not a file"):
        parse_params("segmentation", ["--epochs", "0", "--weights", "nope.pt"])
    run_dir = classification.run(
        classification.Params(epochs=1, runs_dir=str(tmp_path), run_name="pyconv", **TINY_CLASSIFICATION)
    ).run_dir
    evaluation = classification.Params(
        epochs=0, weights=str(run_dir / "best.pt"), runs_dir=str(tmp_path), **TINY_CLASSIFICATION
    )
    other = dataclasses.replace(evaluation, arch="resnet")
    with pytest.raises(CheckpointMismatchError, match=r"best\.pt holds a pyconvresnet18 .* this run builds resnet18"):
        classification.run(other)


def test_detection_checkpoint_evaluates_to_its_runs_final_metrics(tmp_path):
    tiny = DemoDetectionConfig(num_train=16, num_val=8, image_size=64)
    demo = make_demo_coco(tmp_path / "demo_coco", tiny)
    _evaluate_checkpoint_of_a_run(
        detection,
        depth=18,
        image_size=64,
        batch_size=8,
        demo_dir=str(demo),
        demo_train=tiny.num_train,
        demo_val=tiny.num_val,
        demo_image_size=tiny.image_size,
        runs_dir=str(tmp_path / "runs"),
        progress=False,
    )


def test_video_checkpoint_evaluates_to_its_runs_final_metrics(tmp_path):
    _evaluate_checkpoint_of_a_run(
        video,
        batch_size=6,
        demo_dir=str(tmp_path / "demo_kinetics"),
        demo_train_per_class=1,
        demo_val_per_class=1,
        runs_dir=str(tmp_path / "runs"),
        progress=False,
    )


SEGMENTATION = dict(depth=18, output_stride=16, batch_size=4, progress=False)


def test_segmentation_checkpoint_evaluates_to_its_runs_final_metrics(tmp_path):
    root = make_demo_ade20k(tmp_path / "demo", num_train=8, num_val=3)
    _evaluate_checkpoint_of_a_run(
        segmentation, head="fcn", data_dir=str(root), runs_dir=str(tmp_path / "runs"), **SEGMENTATION
    )


def test_an_official_layout_pyconvsegnet_checkpoint_evaluates(tmp_path):
    root = make_demo_ade20k(tmp_path / "demo", num_train=8, num_val=3)
    classes = ADE20K(root, "validation").classes
    torch.manual_seed(2)
    model = randomize_bn(
        build("pyconvsegnet18", num_classes=len(classes), output_stride=16, backbone="pyconvresnet")
    ).eval()
    path = tmp_path / "pyconvsegnet18.pth"
    torch.save({"state_dict": to_official_state_dict(model)}, path)
    p = segmentation.Params(
        head="pyconvsegnet",
        data_dir=str(root),
        epochs=0,
        weights=str(path),
        runs_dir=str(tmp_path / "runs"),
        **SEGMENTATION,
    )
    row = read_metrics(segmentation.run(p).run_dir, "eval")[0]
    task = segmentation.task_for(p, len(classes))
    expected, _ = segmentation.evaluate_dataset(model, ADE20K(root, "validation"), task)
    assert {k: row[k] for k in expected} == pytest.approx(expected)
