"""DDP under the launcher: a stalled rank ends the job within ddp_timeout_s, and torchrun --max-restarts
restarts a killed rank into a run that resumes from last.pt (two gloo processes on the CPU)."""

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyconv_core.engine.files import check_run_dir_free, hold_run_dir
from pyconv_core.engine.logging import EXECUTION_FIELDS, read_metrics
from pyconv_core.run import field_help, parse_params
from pyconv_core.tasks.classification import Params

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    arch="resnet",
    depth=18,
    image_size=16,
    train_subset=192,
    val_subset=64,
    batch_size=16,
    log_every=1,
    pyconv_plan="naive",
)


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYCONV_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def _launcher(runs_dir: Path, run_name: str, **flags) -> list[str]:
    """The launcher with gpus 2: it starts torchrun itself, as a notebook's launch() does."""
    args = [
        sys.executable,
        "-m",
        "pyconv_core.run",
        "classification",
        "--runs-dir",
        str(runs_dir),
        "--run-name",
        run_name,
        "--gpus",
        "2",
    ]
    for key, value in {**TINY, **flags}.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return args


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def _ranks(launcher: int) -> dict[int, int]:
    """RANK -> pid of the processes that the launcher's torchrun started (their DataLoader workers excluded)."""
    ranks = {}
    for torchrun in _children(launcher):
        for child in _children(torchrun):
            environ = Path(f"/proc/{child}/environ").read_bytes().decode(errors="replace").split("\0")
            rank = [e.split("=", 1)[1] for e in environ if e.startswith("RANK=")]
            if rank:
                ranks[int(rank[0])] = child
    return ranks


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def _wait(condition, proc: subprocess.Popen, what: str, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{what} never happened"
        time.sleep(0.2)


def test_timeout_and_restarts_are_checked_execution_parameters():
    with pytest.raises(ValueError, match=r"ddp_timeout_s must be > 0 seconds, got 0"):
        Params(ddp_timeout_s=0)
    with pytest.raises(ValueError, match=r"max_restarts must be >= 0, got -1"):
        Params(max_restarts=-1)
    p = parse_params("classification", ["--ddp-timeout-s", "30", "--max-restarts", "2"])
    assert (p.ddp_timeout_s, p.max_restarts) == (30.0, 2)
    assert {"ddp_timeout_s", "max_restarts"} <= set(EXECUTION_FIELDS)  # a resume may change them
    assert Params().ddp_timeout_s == 300.0 and Params().max_restarts == 0
    helps = field_help(Params)  # the launcher's --help
    assert helps["ddp_timeout_s"].startswith("seconds a DDP collective") and "300 s" in helps["ddp_timeout_s"]
    assert helps["max_restarts"].startswith("times torchrun restarts every process")


def _hold_fork_and_die(folder: Path, pid_file: Path) -> None:
    """Hold the run folder, fork a child that outlives this process (as a DataLoader worker outlives its
    killed parent for seconds), and die at once."""
    with hold_run_dir(folder):
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))
        child.start()
        pid_file.write_text(str(child.pid))
        os._exit(0)


def test_a_killed_runs_forked_child_does_not_keep_the_folder_locked(tmp_path):
    # the cause of failed restarts: a killed rank 0's DataLoader workers held its lock, refusing the restarted run
    folder, pid_file = tmp_path / "run", tmp_path / "child.pid"
    holder = multiprocessing.get_context("fork").Process(target=_hold_fork_and_die, args=(folder, pid_file))
    holder.start()
    holder.join(60)
    child = int(pid_file.read_text())
    try:
        assert Path(f"/proc/{child}").exists()  # the forked child still lives
        check_run_dir_free(folder)
        with hold_run_dir(folder):
            pass
    finally:
        os.kill(child, signal.SIGKILL)


TIMEOUT_S = 60  # above the start-up skew of two ranks on a loaded 2-core machine


def test_a_stalled_rank_ends_the_job_with_one_line_naming_the_timeout(tmp_path):
    proc = subprocess.Popen(
        _launcher(tmp_path, "stall", epochs=3, ddp_timeout_s=TIMEOUT_S),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ranks: dict[int, int] = {}
    try:
        _wait(lambda: any(r["kind"] == "step" for r in _rows(tmp_path / "stall")), proc, "a training step")
        ranks = _ranks(proc.pid)
        os.kill(ranks[1], signal.SIGSTOP)  # rank 1 hangs (a stuck read, a deadlock); rank 0 waits in a collective
        stalled = time.time()
        out, err = proc.communicate(timeout=TIMEOUT_S + 300)
        elapsed = time.time() - stalled
    finally:
        proc.kill()
        for pid in ranks.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 1, err[-3000:]
    # rank 0 gives up after the timeout; torchrun then waits 30 s for the stopped rank before killing it
    assert TIMEOUT_S - 15 <= elapsed < TIMEOUT_S + 30 + 120, elapsed  # 15: a step's start
    line = next(line for line in err.splitlines() if line.startswith("error: rank 0:"))
    assert f"waited more than ddp_timeout_s={TIMEOUT_S} s" in line and "--ddp-timeout-s" in line, line
    assert err.strip().splitlines()[-1].startswith("error: torchrun's processes failed"), err[-3000:]


def test_torchrun_restarts_a_killed_rank_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "restart"
    # rank 0 (the lock holder and writer, with a DataLoader worker) is killed once, after epoch 1 is saved
    proc = subprocess.Popen(
        _launcher(tmp_path, "restart", epochs=3, max_restarts=1, num_workers=1),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait(lambda: any(r["kind"] == "step" and r["epoch"] > 1 for r in _rows(run_dir)), proc, "epoch 2's first step")
        os.kill(_ranks(proc.pid)[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=1200)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "torchrun restart 1: resuming the run from its last.pt" in out, out
    assert [r["epoch"] for r in read_metrics(run_dir, "train")] == [1, 2, 3]
    assert [r["epoch"] for r in read_metrics(run_dir, "eval")] == [1, 2, 3]
    config = json.loads((run_dir / "config.json").read_text())
    assert [resume["at"] for resume in config["resumes"]] == [[1, 0]], config["resumes"]  # from epoch 1's last.pt
