"""python -m pyconv_core.export: a classification run and an authors'-layout segmentation file become a
torch.export program and an ONNX graph that compute what the eager model computes, with the PyConv plans
the run recorded (fewer convolutions than the naive plan's); wrong input ends with one ``error:`` line."""

import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import torch

from pyconv_core import build, to_official_state_dict
from pyconv_core.engine.checkpoint import load_checkpoint, save_atomic
from pyconv_core.export import main
from pyconv_core.layers.pyconv import PyConv, pyconv_plans, set_pyconv_plan
from pyconv_core.run import load_run_model
from pyconv_core.tasks import classification
from tests.official_reference import randomize_bn

TINY = dict(
    arch="pyconvresnet",
    depth=18,
    image_size=16,
    train_subset=64,
    val_subset=32,
    batch_size=32,
    progress=False,
    pyconv_plan="auto",
)
SIZE = ["--image-size", "16", "--batch", "32"]  # the run's evaluation batches: their recorded plans apply as they are


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A one-epoch classification run under plan mode auto: its checkpoints record the plans it chose."""
    runs = tmp_path_factory.mktemp("runs")
    return classification.run(classification.Params(epochs=1, runs_dir=str(runs), run_name="tiny", **TINY)).run_dir


def _eval_choices(run_dir, which: str) -> dict[str, list[str]]:
    return {
        name: [plan for key, plan in table.items() if key.endswith(" eval")]
        for name, table in pyconv_plans(load_run_model(run_dir, which)).items()
    }


def _naive_reference(run_dir, x: torch.Tensor) -> torch.Tensor:
    """The run's model computing as the authors' code does (every level alone)."""
    model = load_run_model(run_dir)
    set_pyconv_plan(model, "naive")
    with torch.no_grad():
        return model(x)


def _convolutions(path) -> int:
    graph = torch.export.load(path).graph
    return sum(1 for node in graph.nodes if node.op == "call_function" and "conv" in str(node.target))


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_a_run_folder_exports_with_its_recorded_plans_and_round_trips(run_dir, fmt):
    result = main(["pyconvresnet18", "--weights", str(run_dir), "--format", fmt, *SIZE])
    assert result.path == run_dir / ("best.pt2" if fmt == "torch_export" else "best.onnx") and result.path.is_file()
    assert result.max_abs_diff <= result.tolerance
    recorded = _eval_choices(run_dir, "best")
    assert recorded and all(result.plans[name] in plans for name, plans in recorded.items())
    x = torch.randn(5, 3, 16, 16)  # another batch size than the one traced
    if fmt == "torch_export":
        with torch.no_grad():
            got = torch.export.load(result.path).module()(x)
    else:
        session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(np.asarray(session.run(None, {"images": x.numpy()})[0]))
    expected = _naive_reference(run_dir, x)
    assert got.shape == (5, 10)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_graph_holds_the_recorded_plan_not_the_naive_one(run_dir, tmp_path):
    """A checkpoint whose recorded plans merge every level into one convolution exports with one convolution
    per such PyConv, where the naive export has one per level."""
    state, model = load_checkpoint(run_dir / "best.pt"), load_run_model(run_dir)
    levels = {name: len(m.levels) for name, m in model.named_modules() if isinstance(m, PyConv)}
    recorded = pyconv_plans(model)
    merged = {name: "".join(str(i) for i in range(levels[name])) for name in recorded}
    for name, m in model.named_modules():
        if name in recorded:
            m.choices = dict.fromkeys(recorded[name], merged[name])
    state["model"] = model.state_dict()
    doctored = tmp_path / "merged.pt"
    save_atomic(state, doctored)
    result = main(["pyconvresnet18", "--weights", str(doctored), *SIZE])
    assert result.plans == {name: merged.get(name, "0") for name in levels}
    naive = main(
        ["pyconvresnet18", "--weights", str(doctored), "--plan", "naive", "--out", str(tmp_path / "n.pt2"), *SIZE]
    )
    assert set(naive.plans.values()) == {"|".join(p) for p in merged.values()} | {"0"}
    saved = sum(levels[name] - 1 for name in merged)
    assert saved > 0 and _convolutions(naive.path) - _convolutions(result.path) == saved
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        got = torch.export.load(result.path).module()(x)
    torch.testing.assert_close(got, _naive_reference(run_dir, x), rtol=1e-4, atol=1e-4)


def test_an_authors_layout_segmentation_file_exports_to_onnx(tmp_path):
    torch.manual_seed(3)
    model = randomize_bn(build("pyconvsegnet18", num_classes=5, output_stride=8, backbone="pyconvresnet")).eval()
    path = tmp_path / "pyconvsegnet18.pth"
    torch.save({"state_dict": to_official_state_dict(model)}, path)
    with pytest.raises(SystemExit):  # the file records no model arguments: the classes and backbone must be given
        main(["pyconvsegnet18", "--weights", str(path), "--image-size", "48"])
    result = main(
        [
            "pyconvsegnet18",
            "--weights",
            str(path),
            "--model-arg",
            "num_classes=5",
            "--model-arg",
            "backbone=pyconvresnet",
            "--image-size",
            "48",
            "--format",
            "onnx",
            "--plan",
            "0|123",
        ]
    )
    assert result.path == tmp_path / "pyconvsegnet18.onnx" and result.max_abs_diff <= result.tolerance
    four_levels = [n for n, m in model.named_modules() if isinstance(m, PyConv) and len(m.levels) == 4]
    assert four_levels and all(result.plans[n] == "0|123" for n in four_levels)
    x = torch.randn(3, 3, 48, 48)
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(np.asarray(session.run(None, {"images": x.numpy()})[0]))
    with torch.no_grad():
        expected = model(x)  # naive: the model as built
    assert got.shape == (3, 5, 48, 48)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_wrong_input_ends_with_one_error_line(run_dir, tmp_path, capsys):
    corrupted = tmp_path / "best.pt"
    corrupted.write_bytes((run_dir / "best.pt").read_bytes()[:4096])  # a partial copy, without its sha256 record
    command = [sys.executable, "-m", "pyconv_core.export", "pyconvresnet18", "--weights", str(corrupted)]
    launched = subprocess.run(command, capture_output=True, text=True)
    assert launched.returncode == 1 and launched.stderr.startswith(f"error: checkpoint {corrupted} cannot be read")
    assert len(launched.stderr.strip().splitlines()) == 1, launched.stderr
    nope, empty, best = tmp_path / "nope", tmp_path / "empty", run_dir / "best.pt"
    empty.mkdir()
    cases = [
        ("pyconvresnet18", nope, f"error: --weights '{nope}' is neither a run folder nor a checkpoint file"),
        ("pyconvresnet18", empty, f"error: run folder {empty} holds neither best.pt nor last.pt"),
        ("resnet18", run_dir, f"error: --weights {best} holds a pyconvresnet18"),
        ("pyconvresnet19", run_dir, "error: unknown model 'pyconvresnet19'. Did you mean pyconvresnet18"),
        ("ssd18", run_dir, "error: model 'ssd18' is a detection model"),
    ]
    for model, weights, expected in cases:
        with pytest.raises(SystemExit) as stopped:
            main([model, "--weights", str(weights), *SIZE])
        stderr = capsys.readouterr().err
        assert stopped.value.code == 1 and stderr.startswith(expected), (model, weights, stderr)
        assert len(stderr.strip().splitlines()) == 1, stderr
    assert not list(tmp_path.glob("*.pt2"))
    with pytest.raises(SystemExit) as stopped:
        main(["pyconvresnet18", "--weights", str(run_dir), "--format", "tflite"])
    assert stopped.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
