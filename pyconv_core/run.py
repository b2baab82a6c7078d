"""One launcher for every task, headless and multi-GPU:

    python -m pyconv_core.run classification --arch pyconvresnet --depth 50 --data-dir /imagenet
    torchrun --nproc_per_node 8 -m pyconv_core.run classification --arch pyconvresnet --depth 50 --data-dir /imagenet

The flags are the fields of the task's ``Params`` (the same names as the notebook's parameters);
``--help`` after the task shows each with the comment beside its field. A notebook with ``gpus > 1``
starts this launcher under torchrun through :func:`launch`; a notebook's setup cell calls
:func:`check_notebook_parameters`, so that papermill cannot pass a parameter it does not declare.
Bad input (wrong paths, malformed data or checkpoints, invalid parameters, a diverged loss, a run
folder in use, a full disk) ends with one ``error:`` line naming the problem and exit status 1;
``PYCONV_TRACEBACK=1`` shows the traceback instead. A run stopped by SIGTERM or SIGINT (a scheduler's
preemption, Ctrl-C) saves ``last.pt`` mid-epoch and exits with :data:`EXIT_STOPPED` (75, sysexits'
EX_TEMPFAIL: try again later); ``--resume true`` continues it. Under torchrun every collective waits at
most ``--ddp-timeout-s`` for the other processes (a stalled rank ends the job with one ``error: rank N:``
line), and with ``--max-restarts N`` (``gpus > 1``) torchrun restarts every process after one fails, the
restarted run resuming from ``last.pt``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib
import inspect
import io
import os
import subprocess
import sys
import tokenize
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from pyconv_core.engine import distributed as dist
from pyconv_core.engine.checkpoint import load_checkpoint
from pyconv_core.engine.logging import workbook_path
from pyconv_core.registry import build
from pyconv_core.tasks.base import annotation_kind, check_value

__all__ = [
    "TASKS",
    "EXIT_STOPPED",
    "launch",
    "parse_params",
    "params_to_argv",
    "load_run_model",
    "field_help",
    "check_notebook_parameters",
]

EXIT_STOPPED = 75  # exit status of a run stopped by SIGTERM/SIGINT after saving last.pt (EX_TEMPFAIL): resume it

TASKS = {
    "classification": "pyconv_core.tasks.classification",
    "detection": "pyconv_core.tasks.detection",
    "video": "pyconv_core.tasks.video",
    "segmentation": "pyconv_core.tasks.segmentation",
}


def _task_module(task: str):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return importlib.import_module(TASKS[task])


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# the base type of a field's annotation (a string under ``from __future__ import annotations``) -> its flag's parser
_FLAG_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float}


def _flag_parser(annotation: object) -> Callable[[str], Any]:
    """The parser of a field's flag: its type's, where ``none`` gives None if the field may be None."""
    kind, optional = annotation_kind(str(annotation))
    parse = _to_bool if kind == "bool" else _FLAG_TYPES.get(kind, str)
    if not optional:
        return parse
    return lambda text: None if text.lower() == "none" else parse(text)


def _to_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _comments(source: str) -> dict[int, str]:
    """Line number (1-based) -> the text of the ``#`` comment on that line of ``source``."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}


def field_help(params_cls: type) -> dict[str, str]:
    """Each field's help: the comment beside it in the class body (``epochs: int = 3  # passes``),
    or the comment lines right above it; a subclass's comment wins over its base's."""
    helps: dict[str, str] = {}
    for cls in reversed(params_cls.__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        source = inspect.getsource(cls)
        lines, comments = source.splitlines(), _comments(source)
        body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)).body
        for node in body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                first = node.lineno
                while first > 1 and lines[first - 2].lstrip().startswith("#"):
                    first -= 1
                above = " ".join(comments[n] for n in range(first, node.lineno))
                text = comments.get(node.end_lineno or node.lineno) or above
                if text:
                    helps[node.target.id] = text
    return helps


def parse_params(task: str, argv: Sequence[str]) -> Any:
    """The task's ``Params`` from command-line flags (``--data-dir /x --epochs 90``), checked."""
    params_cls = _task_module(task).Params
    parser = argparse.ArgumentParser(prog=f"python -m pyconv_core.run {task}")
    helps = field_help(params_cls)
    for f in dataclasses.fields(params_cls):
        text = f"{helps[f.name]} " if f.name in helps else ""
        parser.add_argument(
            _flag(f.name),
            type=_flag_parser(f.type),
            default=f.default,
            help=f"{text}(default: {f.default!r})".replace("%", "%%"),
        )
    return params_cls(**vars(parser.parse_args(list(argv))))


def _assignments(source: str) -> dict[str, str]:
    """Names that a cell's top-level statements assign -> their annotation's text ("" if none)."""
    names = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = ast.unparse(node.annotation)
        elif isinstance(node, ast.Assign):
            names.update({t.id: "" for t in node.targets if isinstance(t, ast.Name)})
    return names


def check_notebook_parameters() -> None:
    """In a notebook run by papermill: refuse a parameter that the notebook's ``parameters`` cell does
    not declare, and a value of another type than the one declared (``epochs: int``).

    Papermill only warns "Passed unknown parameter" and runs the notebook anyway, without the
    misspelt setting. The notebook's setup cell calls this first: papermill's ``injected-parameters``
    cell (it begins with ``# Parameters``) ran right after the ``parameters`` cell, and the kernel
    keeps the source of every cell it ran (``In``). Without papermill there is nothing to check."""
    from IPython import get_ipython

    shell = get_ipython()
    ran = list(shell.user_ns.get("In", [])) if shell is not None else []
    injected = [i for i, source in enumerate(ran) if i and source.startswith("# Parameters\n")]
    if not injected:
        return
    declared = _assignments(ran[injected[-1] - 1])
    for name in _assignments(ran[injected[-1]]):
        if name not in declared:
            close = difflib.get_close_matches(name, declared, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"{name!r} is not a parameter of this notebook{hint}. Its parameters: "
                f"{', '.join(declared)} (papermill --help-notebook NOTEBOOK describes them)"
            )
        shell.user_ns[name] = check_value(name, shell.user_ns[name], declared[name])


def params_to_argv(params: Any) -> list[str]:
    """Flags that :func:`parse_params` turns back into ``params``."""
    return [arg for f in dataclasses.fields(params) for arg in (_flag(f.name), str(getattr(params, f.name)))]


def launch(task: str, params: Any) -> Path:
    """Run an experiment and return its run folder: in this process, or under torchrun when
    ``params.gpus > 1`` (the notebook then reads the results from the run folder)."""
    return _launch(task, params)[0]


def _launch(task: str, params: Any) -> tuple[Path, int | None]:
    """:func:`launch`, also returning the signal that stopped the run early in this process (None: it
    finished, or it ran under torchrun)."""
    module = _task_module(task)
    if dist.launched():  # a torchrun process (whatever gpus says): join the group with the run's timeout
        if dist.restart_count() and not params.resume:  # torchrun --max-restarts: continue, never start over
            if dist.launched_rank() == 0:
                print(f"torchrun restart {dist.restart_count()}: resuming the run from its last.pt")
            params = dataclasses.replace(params, resume=True)
        dist.init(params.ddp_timeout_s)
    if params.gpus <= 1 or dist.launched():
        result = module.run(params)
        return result.run_dir, result.stopped_by
    # a free port per job: the default 29500 fails a second job on this host
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={params.gpus}",
        f"--max-restarts={params.max_restarts}",
        "-m",
        "pyconv_core.run",
        task,
        *params_to_argv(params),
    ]
    status = subprocess.run(cmd).returncode
    if status:
        raise ChildProcessError(
            f"torchrun's processes failed (torchrun exit status {status}): the 'error: rank' "
            f"lines above say why" + ("" if params.max_restarts else "; max_restarts restarts them, resuming last.pt")
        )
    return workbook_path(params.runs_dir) / module.train_config(params).run_name, None


def load_run_model(run_dir: str | Path, which: str = "best") -> nn.Module:
    """Rebuild a run's model from its checkpoint alone (``best`` or ``last``), in eval mode; its layers'
    state brings the run's PyConv execution plans."""
    state = load_checkpoint(Path(run_dir) / f"{which}.pt")
    args = dict(state["model_args"])
    model = build(args.pop("name"), **args)
    model.load_state_dict(state["model"])
    return model.eval()


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + f"\nTasks: {', '.join(TASKS)}")
        return
    try:
        run_dir, stopped_by = _launch(argv[0], parse_params(argv[0], argv[1:]))
        print(run_dir)
        if stopped_by:
            raise SystemExit(EXIT_STOPPED)
    except (ValueError, OSError, FloatingPointError, RuntimeError) as err:
        # input errors (their message says the fix), and a collective that another process stalled or ended
        message = dist.collective_failure(err) if isinstance(err, RuntimeError) else str(err)
        if message is None or os.environ.get("PYCONV_TRACEBACK") == "1":
            raise
        where = f"rank {dist.launched_rank()}: " if dist.launched() else ""
        print(f"error: {where}{message}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        dist.cleanup()


if __name__ == "__main__":
    main()
