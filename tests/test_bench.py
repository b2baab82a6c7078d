"""The speed bench: a tiny real CPU run, its JSON record, the ratios, video clips and setup hooks."""

import json
import statistics

import pytest
import torch
from torch import nn

from pyconv_core import build
from pyconv_core.bench import BenchSettings, add_ratios, default_baseline, main, make_candidate, run_bench
from pyconv_core.layers.pyconv import PyConv
from pyconv_core.loader_bench import LOADER_TASKS, time_loader, training_set
from pyconv_core.profile import count_params

TINY = BenchSettings(batch=1, size=32, frames=4, modes=("infer",), repeats=1, warmup=1, iters=1)


@pytest.fixture
def one_thread():
    """The bench's --threads sets torch's global thread count; put it back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cpu_run_writes_the_json_record(tmp_path, capsys, one_thread):
    argv = [
        "--models",
        "pyconvresnet18",
        "resnet18",
        "--baseline",
        "resnet18",
        "--batch",
        "2",
        "--size",
        "32",
        "--repeats",
        "3",
        "--warmup",
        "1",
        "--iters",
        "1",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--num-classes",
        "10",
        "--name",
        "tiny",
        "--out-dir",
        str(tmp_path),
    ]
    main(argv)
    record = json.loads((tmp_path / "tiny.json").read_text())
    assert record["command"] == "python -m pyconv_core.bench " + " ".join(argv)
    assert record["machine"]["torch"] == torch.__version__ and record["machine"]["torch_threads"] == 1
    assert record["settings"]["batch"] == 2 and record["settings"]["modes"] == ["train", "infer"]
    assert record["baseline"] == "resnet18"
    rows = record["results"]
    assert [(r["model"], r["mode"]) for r in rows] == [
        ("pyconvresnet18", "train"),
        ("pyconvresnet18", "infer"),
        ("resnet18", "train"),
        ("resnet18", "infer"),
    ]
    base = {r["mode"]: r for r in rows if r["model"] == "resnet18"}
    for r in rows:
        assert r["input_shape"] == [2, 3, 32, 32] and len(r["latencies_s"]) == 3
        assert r["latency_s"] == statistics.median(r["latencies_s"]) > 0
        assert r["throughput"] == pytest.approx(2 / r["latency_s"])
        assert r["ratio"] == pytest.approx(r["throughput"] / base[r["mode"]]["throughput"])
        assert len(r["cpu_times_s"]) == 3 and r["cpu_s"] == statistics.median(r["cpu_times_s"]) > 0
        assert r["cpu_ratio"] == pytest.approx(base[r["mode"]]["cpu_s"] / r["cpu_s"])
    assert base["train"]["ratio"] == base["infer"]["ratio"] == 1.0
    assert rows[0]["params"] == count_params(build("pyconvresnet18", num_classes=10))
    table = capsys.readouterr().out
    assert "vs resnet18" in table and "pyconvresnet18" in table and str(tmp_path / "tiny.json") in table


def test_ratios_pair_modes_and_skip_other_input_kinds():
    image, clip = [8, 3, 224, 224], [8, 3, 16, 224, 224]
    rows = [
        {"model": "a", "mode": "train", "throughput": 30.0, "cpu_s": 0.5, "input_shape": image},
        {"model": "a", "mode": "infer", "throughput": 90.0, "cpu_s": 0.2, "input_shape": image},
        {"model": "base", "mode": "train", "throughput": 20.0, "cpu_s": 1.0, "input_shape": image},
        {"model": "base", "mode": "infer", "throughput": 100.0, "cpu_s": 0.1, "input_shape": image},
        {"model": "clip", "mode": "train", "throughput": 2.0, "cpu_s": 3.0, "input_shape": clip},
    ]
    rows = add_ratios(rows, "base")
    assert [r["ratio"] for r in rows] == [1.5, 0.9, 1.0, 1.0, None]
    assert [r["cpu_ratio"] for r in rows] == [2.0, 0.5, 1.0, 1.0, None]


def test_video_clips_and_setup_hooks():
    seen = []

    def hook(model: nn.Module, settings: BenchSettings) -> nn.Module:
        seen.append((type(model).__name__, settings.frames))
        return model

    rows = run_bench(["tv:r3d_18"], TINY, setup=[hook], log=lambda _: None)
    assert rows[0]["input_shape"] == [1, 3, 4, 32, 32] and rows[0]["throughput"] > 0
    assert seen == [("VideoResNet", 4)]
    assert default_baseline(["tv:r3d_18"]) == "tv:r3d_18"
    assert default_baseline(["resnet18", "tv:r3d_18"]) == "tv:resnet50"


def test_non_classifier_output_is_refused():
    class Dense(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return {"out": self.model(x)}

    with pytest.raises(ValueError, match=r"resnet18: the bench times classifiers.*got dict"):
        run_bench(["resnet18"], TINY, setup=[lambda m, s: Dense(m)], log=lambda _: None)


def test_unknown_models_are_named():
    with pytest.raises(ValueError, match=r"unknown torchvision model 'resnet5O'.*list_models"):
        make_candidate("tv:resnet5O", TINY)
    with pytest.raises(ValueError, match="unknown model 'resnet5O'"):
        make_candidate("resnet5O", TINY)
    with pytest.raises(SystemExit):
        main(["--models", "resnet18", "--batch", "0"])


def test_pyconv_plans_and_layer_table(tmp_path, capsys, one_thread):
    """Models with multi-level PyConvs run once per plan; a baseline ResNet (one-level PyConvs only) runs once."""
    argv = [
        "--models",
        "pyconvresnet18",
        "resnet34",
        "--pyconv-plan",
        "naive",
        "auto",
        "--baseline",
        "resnet18",
        "--batch",
        "2",
        "--size",
        "32",
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--iters",
        "1",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--layers",
        "--name",
        "plans",
        "--out-dir",
        str(tmp_path),
    ]
    main(argv)
    record = json.loads((tmp_path / "plans.json").read_text())
    assert [r["model"] for r in record["results"]][::2] == [
        "pyconvresnet18@naive",
        "pyconvresnet18@auto",
        "resnet34",
        "resnet18",
    ]
    multi_level = sum(isinstance(m, PyConv) and len(m.levels) > 1 for m in build("pyconvresnet18").modules())
    for r in record["results"]:
        if r["model"] == "pyconvresnet18@naive":
            assert r["pyconv_plans"] == {"naive": multi_level}
        if r["model"] == "pyconvresnet18@auto":  # every multi-level layer chose a plan in each mode
            assert sum(r["pyconv_plans"].values()) == multi_level
    layers = record["layers"]
    assert {r["layer"] for r in layers} >= {"layer1.0.conv1", "layer3.1.conv1"}
    first = [r for r in layers if r["layer"] == "layer1.0.conv1"]
    # the plain conv, then the 7 partitions of pyconv4 within 4x the naive MACs
    assert [r["plan"] for r in first] == [
        "plain conv",
        "0|1|2|3",
        "0|1|23",
        "0|12|3",
        "0|123",
        "0|13|2",
        "01|2|3",
        "01|23",
    ]
    assert all(r["train_ms"] > 0 and r["infer_ms"] > 0 for r in layers)
    assert "train/plain" in capsys.readouterr().out


PAPER_INPUTS = {
    "classification": (3, 224, 224),
    "detection": (3, 300, 300),
    "segmentation": (3, 473, 473),
    "video": (1, 3, 16, 224, 224),
}  # views x channels x frames x side x side


@pytest.mark.parametrize("task", LOADER_TASKS)
def test_loader_bench_times_each_tasks_training_set_at_the_papers_size(task, tmp_path):
    dataset, collate_fn = training_set(task, items=4, folder=str(tmp_path))
    assert tuple(dataset[0][0].shape) == PAPER_INPUTS[task]
    row = time_loader(dataset, collate_fn, workers=1, batch=2, seconds=0.5)
    assert row["workers"] == 1 and row["items"] >= 2 and row["items_per_s"] == row["items"] / row["seconds"] > 0


def test_loader_bench_from_the_command_line_writes_its_table_and_json(tmp_path, capsys):
    record = main(
        [
            "--loader",
            "classification",
            "--workers",
            "0",
            "--seconds",
            "0.3",
            "--batch",
            "2",
            "--loader-items",
            "4",
            "--loader-dir",
            str(tmp_path / "data"),
            "--out-dir",
            str(tmp_path),
            "--name",
            "loaders",
        ]
    )
    saved = json.loads((tmp_path / "loaders.json").read_text())
    assert saved["loaders"] == record["loaders"] and [r["task"] for r in saved["loaders"]] == ["classification"]
    assert "| classification | 0 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--workers", "0"])  # neither --models nor --loader
