"""The shared Trainer on the classification task: learning, resume, DDP, bad input, NaN."""

import dataclasses
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyconv_core import build
from pyconv_core.data.classification import FashionMNIST, collate_skipping_bad
from pyconv_core.engine.checkpoint import load_checkpoint
from pyconv_core.engine.logging import read_metrics
from pyconv_core.engine.planned import tune_plans_eagerly
from pyconv_core.engine.schedules import param_groups
from pyconv_core.engine.trainer import NonFiniteLossError, TrainConfig, fit
from pyconv_core.layers.pyconv import PyConv, set_pyconv_plan
from pyconv_core.run import EXIT_STOPPED, load_run_model
from pyconv_core.tasks.classification import ClassificationTask, Params, datasets, run, train_config

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(arch="resnet", depth=18, image_size=16, train_subset=384, val_subset=200, batch_size=32)


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYCONV_PROGRESS": "0"}


def test_loss_falls_and_accuracy_beats_chance(tmp_path):
    result = run(
        Params(
            arch="resnet",
            depth=18,
            image_size=32,
            train_subset=1024,
            val_subset=500,
            epochs=2,
            batch_size=32,
            lr=0.4,
            runs_dir=str(tmp_path),
            run_name="learn",
        )
    )
    train = read_metrics(result.run_dir, "train")
    evals = read_metrics(result.run_dir, "eval")
    assert train[1]["train_loss"] < train[0]["train_loss"]
    assert evals[-1]["top1"] > 30.0, evals  # chance is 10% on 10 classes
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["train"]["seed"] == 0 and "git_commit" in config["environment"]
    assert config["environment"]["packages"]["torch"].startswith("2.14")
    assert (result.run_dir / "best.pt").is_file() and (result.run_dir / "last.pt").is_file()
    model = load_run_model(result.run_dir)
    assert model.fc.out_features == 10


def _launcher(tmp_path, run_name, epochs, **flags):
    args = [
        sys.executable,
        "-m",
        "pyconv_core.run",
        "classification",
        "--runs-dir",
        str(tmp_path),
        "--run-name",
        run_name,
        "--epochs",
        str(epochs),
    ]
    for key, value in {**TINY, **flags}.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return args


def _final_state(run_dir):
    return load_checkpoint(Path(run_dir) / "last.pt")


def _wait_for(path: Path, proc, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def _wait_for_training(run_dir: Path, proc, timeout=300):
    """Until the run's first training-loss row (log_every 1): its loop runs, with its workers started."""
    deadline = time.time() + timeout
    while not ((run_dir / "metrics.jsonl").is_file() and '"kind": "step"' in (run_dir / "metrics.jsonl").read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{run_dir} never trained a step"
        time.sleep(0.1)


EPOCHS = 3
AUGMENT = dict(augment=True)  # random crops and flips: a resumed epoch must draw the same ones


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted reference run of the resume tests (no DataLoader workers)."""
    root = tmp_path_factory.mktemp("straight")
    subprocess.run(_launcher(root, "straight", EPOCHS, **AUGMENT), env=_env(), check=True, capture_output=True)
    return _final_state(root / "straight")


@pytest.mark.parametrize("how", ["sigkill", "sigterm", "sigterm to the process group, 2 workers"])
def test_killed_run_resumes_to_the_same_weights(tmp_path, how, straight_run):
    epochs, workers = EPOCHS, 2 if "workers" in how else 0
    args = _launcher(tmp_path, "killed", epochs, **AUGMENT, num_workers=workers, log_every=1)
    proc = subprocess.Popen(
        args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )  # its own process group: the launcher and its workers
    if how == "sigkill":
        _wait_for(tmp_path / "killed" / "last.pt", proc)
        proc.kill()
    else:
        _wait_for_training(tmp_path / "killed", proc)
        if "group" in how:  # as a scheduler or Ctrl-C signals: every process, DataLoader workers included
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    interrupted = _final_state(tmp_path / "killed")
    assert (interrupted["epoch"], interrupted["step_in_epoch"]) != (epochs, 0), "the run finished before the kill"
    if how != "sigkill":
        assert proc.returncode == EXIT_STOPPED and "rerun with resume=True" in out, err
        assert interrupted["step_in_epoch"] > 0 and "Traceback" not in err, err  # saved mid-epoch; no worker died
        deadline = time.time() + 30
        while time.time() < deadline:  # the workers end with the launcher
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("processes of the stopped run are still alive")
    subprocess.run(args + ["--resume", "true"], env=_env(), check=True, capture_output=True)
    straight, resumed = straight_run, _final_state(tmp_path / "killed")
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key  # bit-identical
    rows = read_metrics(tmp_path / "killed", "train")
    assert [r["epoch"] for r in rows] == [1, 2, 3]


DDP_SCRIPT = str(ROOT / "tests" / "scripts" / "ddp_fit.py")


def _ddp_fit(tmp_path, name: str, pyconv_plan: str, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29517",
            DDP_SCRIPT,
            str(tmp_path / name),
            str(tmp_path / f"{name}.pt"),
            pyconv_plan,
            *options,
        ],
        env={**_env(), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )


def test_two_process_ddp_matches_one_process(tmp_path):
    subprocess.run(
        [sys.executable, DDP_SCRIPT, str(tmp_path / "one"), str(tmp_path / "one.pt"), "auto"],
        env=_env(),
        check=True,
        capture_output=True,
    )
    ddp = _ddp_fit(tmp_path, "two", "auto")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for key, value in one["state"].items():
        torch.testing.assert_close(two["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    eval_one = [r for r in one["history"] if r["kind"] == "eval"][-1]
    eval_two = [r for r in two["history"] if r["kind"] == "eval"][-1]
    assert eval_two["num_samples"] == eval_one["num_samples"] == 100
    assert eval_two["top1"] == pytest.approx(eval_one["top1"])
    assert not (tmp_path / "two" / "ddp" / "metrics.jsonl").read_text().count('"epoch": 1, "lr"') > 1


def _workers_of(pid: int) -> dict[int, int]:
    """RANK -> pid of the processes that ``pid`` (torchrun) started."""
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    ranks = {}
    for child in children:
        environ = dict(e.split("=", 1) for e in Path(f"/proc/{child}/environ").read_text().split("\0") if "=" in e)
        if "RANK" in environ:
            ranks[int(environ["RANK"])] = child
    return ranks


def test_a_signal_to_one_ddp_rank_stops_every_rank_at_the_same_step(tmp_path):
    # rank 0 alone writes: had rank 1 stopped on its own, rank 0 would wait for it in the next step forever
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29518",
        "-m",
        *_launcher(tmp_path, "ddp-stop", EPOCHS, log_every=1)[2:],
    ]
    proc = subprocess.Popen(
        args, env={**_env(), "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for_training(tmp_path / "ddp-stop", proc)
        os.kill(_workers_of(proc.pid)[1], signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    state = _final_state(tmp_path / "ddp-stop")
    assert state["step_in_epoch"] > 0 and (state["epoch"], state["step_in_epoch"]) != (EPOCHS, 0), err[-3000:]
    assert out.count("signal 15: saved") == 2, out  # both ranks, at the step saved
    assert f"step {state['step_in_epoch']}; rerun" in out and f"exitcode: {EXIT_STOPPED}" in err


def test_ddp_replicas_train_with_rank0_auto_plans(tmp_path):
    # Each rank's timing is made to prefer a different plan; every replica must still train with
    # rank 0's choice (evaluation plans stay per process: they change no weights).
    ddp = _ddp_fit(tmp_path, "auto", "auto", "--rank-preferences")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "auto.pt")["plans"], torch.load(tmp_path / "auto.pt.rank1")["plans"]
    train0 = {sig: plan for sig, plan in rank0["1"].items() if sig.endswith("train")}
    train1 = {sig: plan for sig, plan in rank1["1"].items() if sig.endswith("train")}
    assert train0 and set(train0.values()) == {"01"}
    assert train1 == train0
    assert {plan for sig, plan in rank1["1"].items() if sig.endswith("eval")} == {"0|1"}


def test_corrupt_image_is_skipped_and_counted(tmp_path, imagenet_dir, caplog):
    result = run(
        Params(
            arch="resnet",
            depth=18,
            data_dir=str(imagenet_dir),
            crop=32,
            epochs=1,
            batch_size=8,
            runs_dir=str(tmp_path),
            run_name="corrupt",
        )
    )
    train, evals = read_metrics(result.run_dir, "train")[0], read_metrics(result.run_dir, "eval")[0]
    assert evals["num_skipped"] == 1 and evals["num_samples"] == 12
    assert train["num_skipped"] <= 1
    assert "n00000001_corrupt.JPEG" in caplog.text


def test_wrong_data_dir_says_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lacks train and val/: expected the ImageNet layout"):
        run(Params(data_dir=str(tmp_path / "nowhere"), runs_dir=str(tmp_path)))
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyconv_core.run",
            "classification",
            "--data-dir",
            str(tmp_path / "nowhere"),
            "--runs-dir",
            str(tmp_path),
        ],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert launched.returncode == 1 and "Traceback" not in launched.stderr
    last = launched.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "nowhere" in last and "expected the ImageNet layout" in last


class _NaNAfterOneEpoch(ClassificationTask):
    steps = 0

    def train_step(self, model, batch, device):
        out = super().train_step(model, batch, device)
        self.steps += 1
        return {**out, "loss": out["loss"] * float("nan")} if self.steps > 12 else out


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path):
    p = Params(**TINY, epochs=3, runs_dir=str(tmp_path), run_name="nan")
    train, val, _ = datasets(p)
    last = tmp_path / "nan" / "last.pt"
    with pytest.raises(NonFiniteLossError) as caught:
        fit(build("resnet18", num_classes=10), _NaNAfterOneEpoch(), train, val, train_config(p))
    assert str(caught.value) == (
        f"run 'nan': loss is nan at epoch 2, step 1. The last good checkpoint {last} is kept: "
        f"start a new run with weights={last} and a lower lr than 0.05 (per 256 images; a "
        f"resume keeps it)."
    )
    assert _final_state(tmp_path / "nan")["epoch"] == 1
    # the advice works: a run from those weights at a lower lr trains on (in its own folder)
    again = run(Params(**TINY, epochs=1, lr=0.02, weights=str(last), runs_dir=str(tmp_path), progress=False))
    assert again.run_dir.name == "resnet18-demo-s0-from-nan-last"
    assert math.isfinite(read_metrics(again.run_dir, "train")[0]["train_loss"])


class _EvaluationFails(ClassificationTask):
    def evaluate(self, model, loader, device):
        batches = iter(loader)
        next(batches)  # its workers have started; the traceback keeps this frame, and so the iterator
        raise OSError("the validation disk went away")


@pytest.mark.parametrize("fails", ["in training", "in evaluation"])
def test_an_error_mid_epoch_leaves_no_dataloader_worker_behind(tmp_path, fails):
    # Workers block SIGTERM (so a preempted run saves first), so terminate() cannot end them: a worker left
    # alive by the traceback of an error made multiprocessing's exit handler wait forever (pytest hung at exit)
    p = Params(**TINY, epochs=2, num_workers=2, runs_dir=str(tmp_path), run_name="fails")
    train, val, _ = datasets(p)
    before = set(multiprocessing.active_children())
    task, error = (_NaNAfterOneEpoch(), NonFiniteLossError) if fails == "in training" else (_EvaluationFails(), OSError)
    with pytest.raises(error) as caught:
        fit(build("resnet18", num_classes=10), task, train, val, train_config(p))
    assert caught.traceback  # still held, as by a notebook or a test showing it
    assert set(multiprocessing.active_children()) - before == set()


class _NaNGradientAt(ClassificationTask):
    """A finite loss whose gradient is NaN at the ``at``-th step (as an overflow in the backward pass gives
    it): that step writes NaN into every weight, though no loss the loop sees is NaN."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.steps, self.at = 0, at

    def train_step(self, model, batch, device):
        out = super().train_step(model, batch, device)
        self.steps += 1
        if self.steps == self.at:  # value + 0, gradient inf * 0 = NaN
            out["loss"] = out["loss"] + torch.sqrt(out["loss"] * 0)
        return out


def test_weights_that_diverge_on_an_epochs_last_step_are_never_checkpointed(tmp_path):
    p = Params(**TINY, epochs=3, runs_dir=str(tmp_path), run_name="nan-weights")
    train, val, _ = datasets(p)
    steps = TINY["train_subset"] // TINY["batch_size"]
    with pytest.raises(NonFiniteLossError, match=r"weights are not finite after epoch 2 .*last.pt is kept"):
        fit(build("resnet18", num_classes=10), _NaNGradientAt(2 * steps), train, val, train_config(p))
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(tmp_path / "nan-weights" / name)
        assert state["epoch"] == 1, name  # the last good epoch
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()), name


class _EvaluationDiverges(ClassificationTask):
    calls = 0

    def evaluate(self, model, loader, device):
        self.calls += 1
        metrics = super().evaluate(model, loader, device)
        return {**metrics, "val_loss": float("inf")} if self.calls == 2 else metrics


def test_an_evaluation_loss_that_is_not_finite_stops_the_run_before_it_is_recorded(tmp_path):
    p = Params(**TINY, epochs=3, runs_dir=str(tmp_path), run_name="inf-eval")
    train, val, _ = datasets(p)
    best = tmp_path / "inf-eval" / "best.pt"
    with pytest.raises(
        NonFiniteLossError,
        match=r"evaluation after epoch 2 gives \{'val_loss': inf\}.*best.pt, "
        r"the best evaluated epoch, is kept; .*last.pt holds epoch 2 "
        rf"unevaluated: start a new run with weights={best} and a lower lr",
    ):
        fit(build("resnet18", num_classes=10), _EvaluationDiverges(), train, val, train_config(p))
    assert load_checkpoint(best)["epoch"] == 1
    assert load_checkpoint(tmp_path / "inf-eval" / "last.pt")["pending_eval"]  # epoch 2, never recorded as good
    # the advice works: best.pt starts a run at a lower lr, evaluated from its first epoch
    again = run(Params(**TINY, epochs=1, lr=0.02, weights=str(best), runs_dir=str(tmp_path), progress=False))
    assert again.run_dir.name == "resnet18-demo-s0-from-inf-eval-best" and read_metrics(again.run_dir, "eval")


def test_unreadable_checkpoint_is_named_with_the_fix(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "last.pt").write_bytes(b"not a checkpoint: the run was copied half-way")
    launched = subprocess.run(
        _launcher(tmp_path, "broken", 1) + ["--resume", "true"], env=_env(), capture_output=True, text=True
    )
    assert launched.returncode == 1 and "Traceback" not in launched.stderr
    last = launched.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint ") and "last.pt cannot be read" in last and "start the run again" in last
    (tmp_path / "broken" / "last.pt").unlink()  # the advice works
    again = run(Params(**TINY, epochs=1, runs_dir=str(tmp_path), run_name="broken", resume=True, progress=False))
    assert [r["epoch"] for r in read_metrics(again.run_dir, "train")] == [1]


def test_too_few_samples_for_a_batch_say_so_and_a_lower_batch_size_trains(tmp_path):
    p = Params(**{**TINY, "train_subset": 24}, epochs=1, runs_dir=str(tmp_path), progress=False)
    with pytest.raises(
        ValueError,
        match=r"^24 training samples give no full batch of 32: lower batch_size or add "
        r"data$",
    ):
        run(p)
    result = run(dataclasses.replace(p, batch_size=8))  # the advice works
    assert read_metrics(result.run_dir, "train")[0]["samples_per_s"] > 0


def test_param_groups_scale_the_lr_by_name_prefix_and_name_unmatched_prefixes():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    base, head = param_groups(model, 0.1, {"1.": 10.0})
    assert (base["lr"], [p.shape for p in base["params"]]) == (0.1, [(3, 2), (3,)])
    assert head["lr"] == pytest.approx(1.0) and [p.shape for p in head["params"]] == [(1, 3), (1,)]
    assert len(param_groups(model, 0.1, {})) == 1
    with pytest.raises(ValueError, match=r"\['head\.'\] match no parameter.*\['0\.', '1\.'\]"):
        param_groups(model, 0.1, {"head.": 10.0})
    with pytest.raises(ValueError, match=r"negative: use factors >= 0 \(0 freezes those parameters\)"):
        param_groups(model, 0.1, {"1.": -10.0})
    frozen = [p.detach().clone() for p in model[1].parameters()]  # the advice: 0 freezes layer 1
    trained = model[0].weight.detach().clone()
    optimizer = torch.optim.SGD(param_groups(model, 0.1, {"1.": 0.0}), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 2)).sum().backward()
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model[1].parameters(), frozen))
    assert not torch.equal(model[0].weight, trained)  # while layer 0 trains


def test_eager_plan_tuning_leaves_no_trace_but_the_plans():
    model = build("pyconvresnet18", num_classes=10)
    set_pyconv_plan(model, "auto")
    data = FashionMNIST("train", 32, 8)
    batch = collate_skipping_bad([data[i] for i in range(8)])
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    torch.manual_seed(3)
    tune_plans_eagerly(model, ClassificationTask(), batch, torch.device("cpu"), None)
    after = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(4))  # RNG as before the pass
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name  # BN running statistics untouched
    assert all(m.chosen(True) for m in model.modules() if isinstance(m, PyConv) and len(m.levels) > 1)
    assert all(p.grad is None for p in model.parameters())


def test_compiled_run_trains_with_measured_plans(tmp_path):
    # torch.compile traces PyConv without timing it: the Trainer measures the plans eagerly first
    model = torch.nn.Sequential(
        PyConv(3, 16, [3, 5], [1, 1]),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 10),
    )
    cfg = TrainConfig(
        run_name="compiled",
        epochs=1,
        batch_size=16,
        lr=0.1,
        lr_reference_batch=16,
        schedule="constant",
        compile=True,
        runs_dir=str(tmp_path),
        progress=False,
    )
    result = fit(model, ClassificationTask(), FashionMNIST("train", 16, 64), FashionMNIST("test", 16, 32), cfg)
    plans = json.loads((result.run_dir / "config.json").read_text())["pyconv_plans"]
    assert [sig for sig in plans["0"] if sig.endswith("train")]
    assert read_metrics(result.run_dir, "eval")[-1]["num_samples"] == 32
