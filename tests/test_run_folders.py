"""A run never silently reuses or overwrites another: runs/<name>/ of other parameters is refused
(execution-only fields aside), the same parameters start again from scratch, resume continues, and a
folder another process trains in is refused at once."""
import dataclasses
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyconv_core import build
from pyconv_core.engine.checkpoint import load_checkpoint
from pyconv_core.engine.logging import read_metrics, write_json, write_jsonl
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
    before = (tmp_path / "tiny" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError) as caught:
        run(dataclasses.replace(finished, epochs=2, lr=0.3))
    message = str(caught.value)
    assert str(tmp_path / "tiny") in message and "epochs=1 (now 2)" in message and "lr=0.0 (now 0.3)" in message
    assert "run_name" in message and "resume=True" in message
    assert (tmp_path / "tiny" / "metrics.jsonl").read_text() == before and (tmp_path / "tiny" / "best.pt").is_file()

    launched = subprocess.run([sys.executable, "-m", "pyconv_core.run", "classification", "--runs-dir", str(tmp_path),
                               "--run-name", "tiny", "--epochs", "2",
                               *[arg for k, v in TINY.items() for arg in ("--" + k.replace("_", "-"), str(v))]],
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert launched.returncode == 1 and "Traceback" not in launched.stderr
    last = launched.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "holds another run" in last and "epochs=1 (now 2)" in last


class _NaNAtOnce(ClassificationTask):
    def train_step(self, model, batch, device):
        out = super().train_step(model, batch, device)
        return {**out, "loss": out["loss"] * float("nan")}


def test_the_same_parameters_start_again_and_leave_nothing_of_the_earlier_run(finished, tmp_path, capsys):
    # only execution fields differ: the same experiment, trained again from scratch
    again = dataclasses.replace(finished, num_workers=1, log_every=2, pyconv_plan="naive", progress=True)
    train, val, _ = datasets(again)
    with pytest.raises(NonFiniteLossError):  # fails before its first checkpoint
        fit(build("resnet18", num_classes=10), _NaNAtOnce(), train, val, train_config(again))
    assert "holds a run of the same parameters: training it again from scratch" in capsys.readouterr().out
    folder = tmp_path / "tiny"
    assert not (folder / "best.pt").exists() and not (folder / "last.pt").exists(), "the earlier run's model survived"
    assert read_metrics(folder) == []


def test_resume_continues_with_changed_parameters_only_from_a_checkpoint(finished, tmp_path, capsys):
    result = run(dataclasses.replace(finished, epochs=2, resume=True))
    assert "resuming" in capsys.readouterr().out
    assert [r["epoch"] for r in read_metrics(result.run_dir, "train")] == [1, 2]
    (tmp_path / "tiny" / "last.pt").unlink()
    with pytest.raises(ValueError, match=r"epochs=2 \(now 3\).*no last\.pt to resume"):
        run(dataclasses.replace(finished, epochs=3, resume=True))


def _record(folder: Path, p: Params, evaluated_epoch: int) -> None:
    """The records a finished classification run leaves: config.json and an evaluation row."""
    write_json(folder / "config.json", {"train": dataclasses.asdict(train_config(p))})
    write_jsonl(folder / "metrics.jsonl", [{"kind": "eval", "epoch": evaluated_epoch, "top1": 50.0}])


def test_demo_backbone_reuses_its_run_and_steps_aside_for_another(tmp_path):
    p = Params(arch="resnet", depth=18, runs_dir=str(tmp_path))
    name = train_config(p).run_name
    # the classification notebook's run: other execution fields, the same experiment
    _record(tmp_path / name, dataclasses.replace(p, num_workers=4, progress=True, run_name=name), p.epochs)
    assert demo_backbone("resnet", 18, str(tmp_path)) == tmp_path / name / "best.pt"
    _record(tmp_path / name, dataclasses.replace(p, epochs=p.epochs + 1), p.epochs + 1)  # another experiment
    _record(tmp_path / f"{name}-backbone", p, p.epochs)
    assert demo_backbone("resnet", 18, str(tmp_path)) == tmp_path / f"{name}-backbone" / "best.pt"
    _record(tmp_path / f"{name}-backbone", dataclasses.replace(p, lr=0.3), p.epochs)
    with pytest.raises(ValueError, match="hold other experiments"):
        demo_backbone("resnet", 18, str(tmp_path))


def test_a_second_run_in_the_same_folder_is_refused_at_once_and_the_first_keeps_its_files(tmp_path):
    args = [sys.executable, "-m", "pyconv_core.run", "classification", "--runs-dir", str(tmp_path), "--run-name",
            "busy", "--epochs", "2", *[arg for k, v in TINY.items() for arg in ("--" + k.replace("_", "-"), str(v))]]
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
    assert last.startswith(f"error: {tmp_path / 'busy'} is in use by another run (pid {first.pid} on "
                           f"{platform.node()}, since ")
    assert took < 60, f"the second run took {took:.0f} s to be refused"
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert [r["epoch"] for r in read_metrics(tmp_path / "busy", "train")] == [1, 2]
    assert load_checkpoint(tmp_path / "busy" / "last.pt")["epoch"] == 2
    assert load_checkpoint(tmp_path / "busy" / "best.pt")["epoch"] in (1, 2)
