"""A run never silently reuses, overwrites or continues another: runs/<name>/ of other parameters is
refused (execution-only fields aside), the same parameters start again from scratch, resume continues
(with more epochs at most, recorded in config.json), and a folder another process trains in is refused
at once. Each refusal's advice is followed to show that it works."""

import dataclasses
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyconv_core import build
from pyconv_core.engine.checkpoint import load_checkpoint
from pyconv_core.engine.logging import read_config, read_metrics, write_json, write_jsonl
from pyconv_core.engine.schedules import lr_multiplier, scaled_lr
from pyconv_core.engine.trainer import NonFiniteLossError, fit
from pyconv_core.tasks.classification import ClassificationTask, Params, datasets, demo_backbone, run, train_config

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(arch="resnet", depth=18, image_size=16, train_subset=128, val_subset=64, batch_size=32, progress=False)


@pytest.fixture
def finished(tmp_path):
    """A finished one-epoch run in runs/tiny/."""
    p = Params(**TINY, epochs=1, runs_dir=str(tmp_path), run_name="tiny")
    run(p)
    return p


def test_other_parameters_in_the_folder_are_refused_with_the_fix(finished, tmp_path):
    folder = tmp_path / "tiny"
    before = (folder / "metrics.jsonl").read_text()
    with pytest.raises(ValueError) as caught:
        run(dataclasses.replace(finished, epochs=2, lr=0.3))
    message = str(caught.value)
    assert message.startswith(f"{folder} holds another run: its config.json records epochs 1 -> 2, lr 0.05 -> 0.3; ")
    assert message.endswith(
        f"pick another run_name (notebooks: run_prefix) for these parameters, or delete {folder} to train them there"
    )  # not resume=True: a resume may not change lr
    assert (folder / "metrics.jsonl").read_text() == before and (folder / "best.pt").is_file()

    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyconv_core.run",
            "classification",
            "--runs-dir",
            str(tmp_path),
            "--run-name",
            "tiny",
            "--epochs",
            "2",
            *[arg for k, v in TINY.items() for arg in ("--" + k.replace("_", "-"), str(v))],
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert launched.returncode == 1 and "Traceback" not in launched.stderr
    last = launched.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "holds another run" in last and "epochs 1 -> 2;" in last

    # the advice works: another run_name trains these parameters, and so does the folder once deleted
    other = run(dataclasses.replace(finished, epochs=2, lr=0.3, run_name="tiny-lr"))
    assert [r["epoch"] for r in read_metrics(other.run_dir, "eval")] == [1, 2]
    shutil.rmtree(folder)
    again = run(dataclasses.replace(finished, epochs=2, lr=0.3))
    assert read_config(again.run_dir)["train"]["lr"] == 0.3 and read_config(again.run_dir)["resumes"] == []


class _NaNAtOnce(ClassificationTask):
    def train_step(self, model, batch, device):
        out = super().train_step(model, batch, device)
        return {**out, "loss": out["loss"] * float("nan")}


def test_the_same_parameters_start_again_and_leave_nothing_of_the_earlier_run(finished, tmp_path, capsys):
    # only execution fields differ: the same experiment, trained again from scratch
    again = dataclasses.replace(finished, num_workers=1, log_every=2, pyconv_plan="naive", progress=True)
    train, val, _ = datasets(again)
    folder = tmp_path / "tiny"
    with pytest.raises(NonFiniteLossError) as caught:  # fails before its first checkpoint
        fit(build("resnet18", num_classes=10), _NaNAtOnce(), train, val, train_config(again))
    assert "holds a run of the same parameters: training it again from scratch" in capsys.readouterr().out
    assert not (folder / "best.pt").exists() and not (folder / "last.pt").exists(), "the earlier run's model survived"
    assert read_metrics(folder) == []
    assert str(caught.value).endswith(
        f"No checkpoint exists yet: train again with a lower lr than 0.05 (per 256 "
        f"images; a resume keeps it) under another run_name, or delete {folder} first."
    )
    # the advice works: a lower lr under another run_name trains (deleting the folder first: the test above)
    lower = run(dataclasses.replace(finished, lr=0.02, run_name="tiny-lower"))
    assert read_config(lower.run_dir)["train"]["lr"] == 0.02 and read_metrics(lower.run_dir, "eval")


def test_more_epochs_resume_the_run_and_config_json_records_each_resume(finished, tmp_path, capsys):
    folder = tmp_path / "tiny"
    with pytest.raises(ValueError, match=r"records epochs 1 -> 2; .*, or resume=True to continue that run with them$"):
        run(dataclasses.replace(finished, epochs=2))
    run(dataclasses.replace(finished, epochs=2, resume=True, log_every=2))  # the advice, and a new log_every
    assert f"resuming {folder} with changed parameters: epochs 1 -> 2" in capsys.readouterr().out
    assert [r["epoch"] for r in read_metrics(folder, "train")] == [1, 2]
    config = read_config(folder)
    assert config["train"]["epochs"] == 2 and len(config["resumes"]) == 1
    resume = config["resumes"][0]
    assert resume["at"] == [1, 0] and resume["changed"] == {"epochs": [1, 2], "log_every": [10, 2]}
    assert time.strptime(resume["time"], "%Y-%m-%d %H:%M:%S")

    # the cosine decay is rebuilt over 2 epochs from the step reached: epoch 1 ended at lr 0, epoch 2 rises again
    steps, per_epoch = read_metrics(folder, "step"), TINY["train_subset"] // TINY["batch_size"]
    peak = scaled_lr(0.05, TINY["batch_size"], 256)  # the demo recipe's lr
    assert [(r["step"], r["lr"]) for r in steps][0] == (per_epoch, 0.0)
    assert [r["step"] for r in steps[1:]] == [per_epoch + 2, per_epoch + 4]
    rising = peak * lr_multiplier("cosine", 2, per_epoch)(per_epoch + 2)
    assert rising > 0 and steps[1]["lr"] == pytest.approx(rising)

    run(dataclasses.replace(finished, epochs=2, resume=True))  # nothing left to train: a resume all the same
    assert [r["changed"] for r in read_config(folder)["resumes"]] == [
        {"epochs": [1, 2], "log_every": [10, 2]},
        {"log_every": [2, 10]},
    ]
    with pytest.raises(ValueError, match=r"cannot be resumed with epochs 2 -> 1: a resume may only add epochs"):
        run(dataclasses.replace(finished, epochs=1, resume=True))

    (folder / "last.pt").unlink()
    with pytest.raises(ValueError, match=r"no last\.pt to resume epochs 2 -> 3; .*or delete "):
        run(dataclasses.replace(finished, epochs=3, resume=True))
    shutil.rmtree(folder)  # the advice works
    assert [
        r["epoch"] for r in read_metrics(run(dataclasses.replace(finished, epochs=3, resume=True)).run_dir, "train")
    ] == [1, 2, 3]


def test_a_resume_that_would_change_the_model_or_the_schedule_is_refused(finished, tmp_path):
    folder = tmp_path / "tiny"
    before = (folder / "metrics.jsonl").read_text(), (folder / "last.pt").read_bytes()
    changes = dict(
        arch="pyconvresnet",
        depth=34,
        image_size=24,
        lr=0.3,
        batch_size=16,
        recipe="standard",
        seed=1,
        amp="bf16",
        train_subset=96,
        augment=True,
        epochs=2,
    )
    with pytest.raises(ValueError) as caught:
        run(dataclasses.replace(finished, resume=True, **changes))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{folder} cannot be resumed with ")
    recorded = read_config(folder)["train"]["extra"]  # the values that ran (a recipe's where left None)
    for name, new in changes.items():
        assert (f"{name} {recorded[name]!r} -> {new!r}" in message) is (name != "epochs"), name
    assert message.endswith(
        "resume with the recorded values, or pick another run_name (notebooks: run_prefix) for these parameters"
    )
    assert ((folder / "metrics.jsonl").read_text(), (folder / "last.pt").read_bytes()) == before

    # the advice works: another run_name trains changed parameters (resuming the recorded values: the test above)
    other = run(dataclasses.replace(finished, resume=True, lr=0.3, seed=1, run_name="tiny-other"))
    assert read_config(other.run_dir)["train"]["seed"] == 1 and read_metrics(other.run_dir, "eval")


def _record(folder: Path, p: Params, evaluated_epoch: int) -> None:
    """The records a finished classification run leaves: config.json and an evaluation row."""
    write_json(folder / "config.json", {"train": dataclasses.asdict(train_config(p))})
    write_jsonl(folder / "metrics.jsonl", [{"kind": "eval", "epoch": evaluated_epoch, "top1": 50.0}])


def test_demo_backbone_reuses_its_run_and_steps_aside_for_another(tmp_path):
    p = Params(arch="resnet", depth=18, runs_dir=str(tmp_path))
    name, epochs = train_config(p).run_name, train_config(p).epochs
    # the classification notebook's run: other execution fields, the same experiment
    _record(tmp_path / name, dataclasses.replace(p, num_workers=4, progress=True, run_name=name), epochs)
    assert demo_backbone("resnet", 18, str(tmp_path)) == tmp_path / name / "best.pt"
    _record(tmp_path / name, dataclasses.replace(p, epochs=epochs + 1), epochs + 1)  # another experiment
    _record(tmp_path / f"{name}-backbone", p, epochs)
    assert demo_backbone("resnet", 18, str(tmp_path)) == tmp_path / f"{name}-backbone" / "best.pt"
    _record(tmp_path / f"{name}-backbone", dataclasses.replace(p, lr=0.3), epochs)
    with pytest.raises(ValueError, match="hold other experiments"):
        demo_backbone("resnet", 18, str(tmp_path))


def test_a_second_run_in_the_same_folder_is_refused_at_once_and_the_first_keeps_its_files(tmp_path):
    args = [
        sys.executable,
        "-m",
        "pyconv_core.run",
        "classification",
        "--runs-dir",
        str(tmp_path),
        "--run-name",
        "busy",
        "--epochs",
        "2",
        *[arg for k, v in TINY.items() for arg in ("--" + k.replace("_", "-"), str(v))],
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock, deadline = tmp_path / "busy" / ".lock", time.time() + 300
    while not (lock.is_file() and lock.read_text().startswith(f"pid {first.pid} ")):
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.1)
    first.send_signal(signal.SIGSTOP)  # it holds the folder, however long the second one takes to start
    try:
        started = time.monotonic()
        second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        took = time.monotonic() - started
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: {tmp_path / 'busy'} is in use by another run (pid {first.pid} on {platform.node()}, since "
    )
    assert took < 60, f"the second run took {took:.0f} s to be refused"
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert [r["epoch"] for r in read_metrics(tmp_path / "busy", "train")] == [1, 2]
    assert load_checkpoint(tmp_path / "busy" / "last.pt")["epoch"] == 2
    assert load_checkpoint(tmp_path / "busy" / "best.pt")["epoch"] in (1, 2)
    # the advice works: once the first has ended, the folder takes a run again
    later = run(Params(**TINY, epochs=2, runs_dir=str(tmp_path), run_name="busy", resume=True))
    assert len(read_config(later.run_dir)["resumes"]) == 1
