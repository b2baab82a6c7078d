"""Parameters are checked before any work, and each error says what is allowed: every task's Params,
the launcher (whose --help shows the fields' comments) and the notebooks under papermill."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest

from pyconv_core.run import field_help, params_to_argv, parse_params
from pyconv_core.tasks import classification, detection, segmentation, video
from pyconv_core.tasks.base import annotation_kind

ROOT = Path(__file__).resolve().parents[1]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYCONV_PROGRESS": "0"}


REFUSED = [
    (classification, dict(epochs="abc"), r"^epochs must be an integer \(or None: the recipe's\), got 'abc'$"),
    (
        classification,
        dict(epochs=0),
        r"^epochs must be >= 1, got 0; epochs 0 evaluates without training and needs "
        r"weights \(a run's best.pt or last.pt, or the authors' released file\)$",
    ),
    (
        classification,
        dict(arch="pyconvrenset"),
        r"arch must be one of 'resnet', 'pyconvresnet', 'pyconvhgresnet' \(with depth\).*did you mean 'pyconvresnet'",
    ),
    (
        classification,
        dict(arch="pyconvhgresnet", depth=18),
        r"depth must be one of 50, 101, 152 for arch 'pyconvhgresnet'",
    ),
    (classification, dict(recipe="standart"), r"recipe must be one of '', 'standard', 'augment', 'demo'"),
    (
        classification,
        dict(amp="fp32"),
        r"amp must be one of 'none', 'bf16', 'fp16' \(or None: the recipe's\), got 'fp32'",
    ),
    (classification, dict(lr="0.1"), r"lr must be a number \(or None: the recipe's\), got '0.1'"),
    (classification, dict(lr=0), r"lr must be > 0 \(or None: the recipe's\), got 0"),
    (classification, dict(batch_size=1), r"batch_size must be at least 2 per process"),
    (classification, dict(resume="yes"), r"resume must be True or False, got 'yes'"),
    (classification, dict(pyconv_plan="fastest"), r"unknown PyConv plan 'fastest'"),
    (detection, dict(batch_size=1), r"batch_size must be at least 2 per process: BatchNorm training needs 2 or more"),
    (detection, dict(batch_size=8, gpus=8), r"at least 2 per process.*got 8 over gpus=8"),
    (detection, dict(depth=34), r"depth must be one of 18, 50, 101 for arch 'pyconvssd', got 34"),
    (detection, dict(image_size=8), r"image_size must be >= 9 \(SSD needs at least two detection maps\)"),
    (video, dict(arch="pyconvresnet3d"), r"arch must be one of 'resnet3d50', 'pyconvresnet3d50'.*did you mean"),
    (video, dict(stage_blocks="1,1,1"), r"stage_blocks must be 4 block counts >= 1, one per stage"),
    (video, dict(amp="recipe"), r"amp must be one of 'none', 'bf16', 'fp16' \(or None: the recipe's\), got 'recipe'"),
    (video, dict(batch_size=1), r"batch_size must be at least 2 per process"),
    (video, dict(gpus=16), r"batch_size must be at least 2 per process.*got 16 over gpus=16"),  # the recipe's batch
    (video, dict(frames=0), r"frames must be >= 1 \(or None: the recipe's\), got 0"),
    (
        segmentation,
        dict(head="pspnte"),
        r"head must be one of 'pyconvsegnet', 'pspnet', 'deeplabv3', 'fcn'.*did you mean 'pspnet'",
    ),
    (segmentation, dict(head="deeplabv3", depth=34), r"depth must be one of 18, 50, 101, 152 for head 'deeplabv3'"),
    (segmentation, dict(output_stride=32), r"output_stride must be one of 8, 16, got 32"),
    (segmentation, dict(epochs=-1), r"epochs must be >= 1, got -1"),
]


@pytest.mark.parametrize(
    "module, values, message", REFUSED, ids=[f"{m.__name__.split('.')[-1]}-{next(iter(v))}" for m, v, _ in REFUSED]
)
def test_a_wrong_value_is_refused_naming_what_is_allowed(module, values, message):
    with pytest.raises(ValueError, match=message):
        module.Params(**values)


def test_an_arch_typo_lists_the_arch_values_not_every_model():
    with pytest.raises(ValueError) as caught:
        classification.Params(arch="resnt")
    assert "pyconvresnet3d50" not in str(caught.value) and "pspnet50" not in str(caught.value)


def test_defaults_and_allowed_values_pass_and_ints_become_floats():
    for module in (classification, detection, video, segmentation):
        module.Params()
    assert classification.Params(arch="pyconvresnet50", lr=1).lr == 1.0 and isinstance(
        classification.Params(lr=1).lr, float
    )
    assert video.Params(stage_blocks="2,2,2,2", batch_size=None).blocks == (2, 2, 2, 2)
    assert segmentation.Params(head="deeplabv3", depth=50).model_name == "deeplabv3_50"


def test_launcher_refuses_before_reading_or_generating_data(tmp_path):
    demo = tmp_path / "demo_coco"
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyconv_core.run",
            "detection",
            "--batch-size",
            "1",
            "--demo-dir",
            str(demo),
            "--runs-dir",
            str(tmp_path),
        ],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert launched.returncode == 1 and "Traceback" not in launched.stderr
    assert launched.stderr.strip().splitlines()[-1].startswith("error: batch_size must be at least 2 per process")
    assert not demo.exists() and not list(tmp_path.glob("*/config.json"))


def test_launcher_help_shows_each_fields_comment():
    helps = field_help(detection.Params)
    assert helps["max_expand"].startswith("SSD's zoom-out augmentation up to this factor")
    assert helps["num_workers"] == "DataLoader worker processes"  # from the shared RunParams
    assert helps["amp"].startswith("none | bf16 | fp16; None: the recipe's")  # from the shared RunParams
    assert helps["lr"].startswith("per the recipe's reference batch of 256")  # the task's own comment wins
    assert field_help(segmentation.Params)["backbone_weights"].startswith("classifier checkpoint of the backbone")
    shown = subprocess.run(
        [sys.executable, "-m", "pyconv_core.run", "video", "--help"],
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "demo training videos per motion class" in " ".join(shown.split())


def _papermill(notebook: Path, out: Path, *params: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "papermill", str(notebook), str(out), *params],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _error(executed: Path) -> tuple[str, str]:
    """The error a papermill-executed notebook stopped with (its ename: evalue) and that cell's source."""
    for cell in json.loads(executed.read_text())["cells"]:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return f"{output['ename']}: {output['evalue']}", "".join(cell["source"])
    return "", ""


@pytest.fixture(scope="module")
def small_notebook(tmp_path_factory):
    """A notebook laid out as the workbook's: a parameters cell, then a setup cell that checks."""
    path = tmp_path_factory.mktemp("nb") / "small.ipynb"
    params = nbformat.v4.new_code_cell('epochs: int = 3  # passes\nlr: float = 0.1  # rate\nheads: list = ["fcn"]')
    params.metadata["tags"] = ["parameters"]
    setup = nbformat.v4.new_code_cell(
        "from pyconv_core.run import check_notebook_parameters\n"
        "check_notebook_parameters()\nprint('checked', epochs, repr(lr), heads)"
    )
    notebook = nbformat.v4.new_notebook(cells=[params, setup])
    notebook.metadata["kernelspec"] = nbformat.read(ROOT / "notebooks" / "00_quickstart.ipynb", 4).metadata.kernelspec
    nbformat.write(notebook, path)
    return path


def test_papermill_parameters_the_notebook_declares_pass(small_notebook, tmp_path):
    out = tmp_path / "out.ipynb"
    done = _papermill(small_notebook, out, "-p", "epochs", "5", "-p", "lr", "1", "-y", "heads: [fcn, pspnet]")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "checked 5 1.0 ['fcn', 'pspnet']" in out.read_text()


@pytest.mark.parametrize(
    "notebook, params, message",
    [
        (
            "00_quickstart",
            ("-p", "batchsize", "4"),
            "'batchsize' is not a parameter of this notebook (did you mean 'batch'?)",
        ),
        ("01_classification", ("-p", "epochs", "-1"), "epochs must be >= 1, got -1"),
        ("02_detection", ("-p", "epochs", "abc"), "epochs must be an integer (or None: the recipe's), got 'abc'"),
        ("03_video", ("-p", "stage_blocks", "1,1,1"), "stage_blocks must be 4 block counts"),
        ("04_segmentation", ("-p", "heads", "fcn"), "heads must be a list, got 'fcn'"),
    ],
)
def test_every_notebook_stops_in_its_setup_cell_on_a_bad_parameter(tmp_path, notebook, params, message):
    out = tmp_path / f"{notebook}.ipynb"
    done = _papermill(ROOT / "notebooks" / f"{notebook}.ipynb", out, *params)
    error, source = _error(out)
    assert done.returncode != 0 and message in error, error
    assert "check_notebook_parameters()" in source  # the setup cell: no data read, nothing trained or shown


@pytest.mark.parametrize("name", ["../x", "/tmp/x", "a/b", "a\\b", "..", "."])
def test_a_run_name_that_would_leave_the_runs_folder_is_refused(name, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"^run_name must be one folder name inside runs_dir \(no '/' or '\\', not "
        r"'\.' or '\.\.'\), got .*: e\.g\. '",
    ):
        classification.Params(run_name=name, runs_dir=str(tmp_path / "runs"))
    p = classification.Params(runs_dir=str(tmp_path / "runs"))
    p.run_name = name  # as a notebook sets it from run_prefix after the parameters are made
    with pytest.raises(ValueError, match=r"^run_name must be one folder name"):
        classification.run(p)
    assert not any(tmp_path.iterdir()), "the run wrote something"


NOTEBOOK_PARAMS = {
    "01_classification": classification,
    "02_detection": detection,
    "03_video": video,
    "04_segmentation": segmentation,
}
# Where a notebook's default is not its Params': the launcher draws progress bars (a notebook under papermill
# must not), and a launched detection or segmentation run starts from scratch unless given a backbone, where
# the demos start from the Fashion-MNIST one.
NOTEBOOK_ONLY_DEFAULTS = {"progress", "backbone_weights"}


def _declared(notebook: str) -> dict[str, object]:
    cell = next(
        c
        for c in nbformat.read(ROOT / "notebooks" / f"{notebook}.ipynb", 4).cells
        if "parameters" in c.metadata.get("tags", [])
    )
    namespace: dict[str, object] = {}
    exec(cell.source, namespace)
    return {name: namespace[name] for name in namespace["__annotations__"]}


@pytest.mark.parametrize("notebook", NOTEBOOK_PARAMS)
def test_a_notebooks_defaults_are_its_params_defaults(notebook):
    declared = _declared(notebook)
    defaults = NOTEBOOK_PARAMS[notebook].Params()
    differ = {
        name: (value, getattr(defaults, name))
        for name, value in declared.items()
        if hasattr(defaults, name) and name not in NOTEBOOK_ONLY_DEFAULTS and value != getattr(defaults, name)
    }
    assert not differ, f"{notebook}'s parameters cell and its Params disagree (notebook, Params): {differ}"


@pytest.mark.parametrize("notebook", NOTEBOOK_PARAMS)
def test_a_notebooks_parameters_make_its_params_without_restating_them(notebook):
    declared = _declared(notebook)
    module = NOTEBOOK_PARAMS[notebook]
    own = [name for name in declared if not hasattr(module.Params(), name)]
    namespace = {**declared, "__annotations__": dict.fromkeys(declared), "seed": 7}
    p = module.Params.from_namespace(namespace, own=own)
    assert p.seed == 7 and p.progress is False
    with pytest.raises(ValueError, match=f"^notebook parameters {own[0]} are not parameters of "):
        module.Params.from_namespace(namespace, own=own[1:])


def test_from_namespace_takes_only_the_declared_parameters_and_the_overrides():
    namespace = {"epochs": 2, "lr": 0.3, "plt": object(), "__annotations__": {"epochs": int, "lr": float}}
    p = classification.Params.from_namespace(namespace, arch="resnet", lr=0.1)
    assert (p.epochs, p.lr, p.arch) == (2, 0.1, "resnet")
    with pytest.raises(ValueError, match="call it with globals\\(\\) after that cell has run"):
        classification.Params.from_namespace({"epochs": 2})


def test_a_parameter_left_none_takes_the_recipes_value_and_the_run_records_what_ran():
    standard = classification.Params(data_dir="/imagenet", arch="resnet", depth=50)
    cfg = classification.train_config(standard)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.milestones) == (90, 256, 0.1, (30.0, 60.0, 80.0))
    assert cfg.extra["lr"] == 0.1 and cfg.extra["epochs"] == 90  # config.json says what ran
    short = classification.train_config(classification.Params(data_dir="/imagenet", epochs=9, lr=0.2))
    assert (short.epochs, short.lr, short.milestones) == (9, 0.2, (3.0, 6.0, 8.0))  # the recipe's shape kept
    augment = classification.Params(data_dir="/imagenet", recipe="augment")
    assert classification.train_config(augment).amp == "bf16" and classification.task_for(augment).cutmix_alpha == 1.0
    assert classification.train_config(dataclasses.replace(augment, amp="none")).amp is None
    kinetics = video.Params(data_dir="/kinetics")
    assert video.sampling(kinetics).frames == 16 and kinetics.blocks is None
    assert video.sampling(video.Params(frames=8)).frames == 8 and video.Params().blocks == (1, 1, 1, 1)


def test_the_launcher_takes_none_for_the_recipes_value():
    p = parse_params("segmentation", ["--lr", "0.3", "--crop", "None", "--epochs", "none"])
    assert (p.lr, p.crop, p.epochs) == (0.3, None, None)
    assert parse_params("segmentation", params_to_argv(p)) == p


@pytest.mark.parametrize("notebook", NOTEBOOK_PARAMS)
def test_papermill_reads_every_parameter_a_notebook_declares(notebook):
    listed = papermill.inspect_notebook(str(ROOT / "notebooks" / f"{notebook}.ipynb"))  # --help-notebook, sweeps
    assert set(listed) == set(_declared(notebook))
    assert {annotation_kind(listed[name]["inferred_type_name"]) for name in ("epochs", "lr")} == {
        ("int", True),
        ("float", True),
    }
