"""One launcher for every task, headless and multi-GPU:

    python -m pyconv_core.run classification --arch pyconvresnet --depth 50 --data-dir /imagenet
    torchrun --nproc_per_node 8 -m pyconv_core.run classification --arch pyconvresnet --depth 50 --data-dir /imagenet

The flags are the fields of the task's ``Params`` (the same names as the notebook's parameters).
A notebook with ``gpus > 1`` starts this launcher under torchrun through :func:`launch`.
Bad input (wrong paths, malformed data or checkpoints, invalid parameters, a diverged loss) ends
with one ``error:`` line naming the problem and exit status 1; ``PYCONV_TRACEBACK=1`` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from pyconv_core.engine import distributed as dist
from pyconv_core.engine.checkpoint import load_checkpoint
from pyconv_core.engine.logging import workbook_path
from pyconv_core.layers.pyconv import load_pyconv_plans, set_pyconv_plan
from pyconv_core.registry import build

__all__ = ["TASKS", "launch", "parse_params", "params_to_argv", "load_run_model"]

TASKS = {"classification": "pyconv_core.tasks.classification", "detection": "pyconv_core.tasks.detection",
         "video": "pyconv_core.tasks.video", "segmentation": "pyconv_core.tasks.segmentation"}


def _task_module(task: str):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return importlib.import_module(TASKS[task])


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# a field's annotation (a string under ``from __future__ import annotations``) -> its flag's parser
_FLAG_TYPES: dict[object, Callable[[str], Any]] = {int: int, float: float, "int": int, "float": float}


def _to_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_params(task: str, argv: Sequence[str]) -> Any:
    """The task's ``Params`` from command-line flags (``--data-dir /x --epochs 90``)."""
    params_cls = _task_module(task).Params
    parser = argparse.ArgumentParser(prog=f"python -m pyconv_core.run {task}")
    for f in dataclasses.fields(params_cls):
        kind = _to_bool if f.type in (bool, "bool") else _FLAG_TYPES.get(f.type, str)
        parser.add_argument(_flag(f.name), type=kind, default=f.default, help=f"(default: {f.default!r})")
    return params_cls(**vars(parser.parse_args(list(argv))))


def params_to_argv(params: Any) -> list[str]:
    """Flags that :func:`parse_params` turns back into ``params``."""
    return [arg for f in dataclasses.fields(params) for arg in (_flag(f.name), str(getattr(params, f.name)))]


def launch(task: str, params: Any) -> Path:
    """Run an experiment and return its run folder: in this process, or under torchrun when
    ``params.gpus > 1`` (the notebook then reads the results from the run folder)."""
    module = _task_module(task)
    if params.gpus <= 1 or dist.is_distributed():
        return module.run(params).run_dir
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={params.gpus}", "-m",
           "pyconv_core.run", task, *params_to_argv(params)]
    subprocess.run(cmd, check=True)
    return workbook_path(params.runs_dir) / module.train_config(params).run_name


def load_run_model(run_dir: str | Path, which: str = "best") -> nn.Module:
    """Rebuild a run's model from its checkpoint alone (``best`` or ``last``), in eval mode, with the
    run's PyConv execution plan."""
    state = load_checkpoint(Path(run_dir) / f"{which}.pt")
    args = dict(state["model_args"])
    model = build(args.pop("name"), **args)
    model.load_state_dict(state["model"])
    set_pyconv_plan(model, state["config"].get("pyconv_plan", "naive"))
    load_pyconv_plans(model, state.get("pyconv_plans", {}))
    return model.eval()


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + f"\nTasks: {', '.join(TASKS)}")
        return
    params = parse_params(argv[0], argv[1:])
    try:
        print(launch(argv[0], params))
    except (ValueError, OSError, FloatingPointError) as err:  # input errors: their message says the fix
        if os.environ.get("PYCONV_TRACEBACK") == "1":
            raise
        where = f"rank {dist.rank()}: " if dist.is_distributed() else ""
        print(f"error: {where}{err}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        dist.cleanup()


if __name__ == "__main__":
    main()
