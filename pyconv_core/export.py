"""Export a classification or segmentation model as an inference graph, checked against PyTorch:

    python -m pyconv_core.export pyconvresnet50 --weights runs/<name> --format onnx
    python -m pyconv_core.export pyconvsegnet50 --weights runs/<name>/best.pt --format torch_export

``--weights`` is a run folder (its ``best.pt``, else ``last.pt``) or a checkpoint file: a run's, a plain
state_dict in this workbook's layout, or the authors' released file (models.official.load_model_weights).
Every PyConv computes in the graph with one fixed execution plan (layers/plans.py): the plan its run
recorded (for the export input's signature, else its latest evaluation choice), or, where the run
recorded none under ``auto``, the fastest one measured now on the export input; so the exported graph is
the fast one, not the authors' per-level convolutions. The graph runs on the CPU in float32 and its batch
size is free; the height and width are those of ``--image-size``. After writing, the file is loaded back
(``torch.export.load``, or an onnxruntime session) and run on a random batch of another size than the
one traced; its largest difference from the eager model must stay within ``--tolerance`` times the
output's scale, or the file is removed. Bad input ends with one ``error:`` line and exit status 1
(``PYCONV_TRACEBACK=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import io
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pyconv_core.engine.checkpoint import load_checkpoint
from pyconv_core.engine.files import write_atomic
from pyconv_core.layers.plans import format_plan, signature
from pyconv_core.layers.pyconv import PyConv, set_pyconv_plan
from pyconv_core.models.official import CheckpointMismatchError, load_model_weights
from pyconv_core.registry import build, model_entry

__all__ = [
    "FORMATS",
    "EXPORT_TASKS",
    "ExportCheckError",
    "ExportResult",
    "resolve_weights",
    "parse_model_args",
    "load_for_export",
    "freeze_pyconv_plans",
    "export_model",
    "check_export",
    "main",
]

FORMATS = {"onnx": ".onnx", "torch_export": ".pt2"}  # --format -> the file's suffix
EXPORT_TASKS = ("classification", "segmentation")  # models taking one image batch and returning one tensor
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # torch.onnx's dynamo exporter, and the runtime that checks
MAX_BATCH = 4096  # the largest batch the graph's free batch dimension accepts


class ExportCheckError(RuntimeError):
    """The reloaded export computes something else than the eager model."""


@dataclass
class ExportResult:
    """What :func:`main` wrote and how the reloaded file compared with the eager model."""

    path: Path
    max_abs_diff: float
    tolerance: float  # the bound max_abs_diff met: --tolerance times max(1, max |output|)
    plans: dict[str, str]  # PyConv module name -> the plan it computes with in the graph


def resolve_weights(weights: str | os.PathLike) -> Path:
    """The checkpoint file that ``weights`` names: itself, or a run folder's ``best.pt`` (else ``last.pt``)."""
    path = Path(weights)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"run folder {path} holds neither best.pt nor last.pt: pass a run folder that "
            f"finished an epoch, or the path of a checkpoint file"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"--weights {str(path)!r} is neither a run folder nor a checkpoint file: pass "
            f"runs/<name> or a .pt/.pth file"
        )
    return path


def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    """``["num_classes=150", "backbone=pyconvresnet"]`` -> builder arguments (values as Python literals, else
    strings)."""
    args: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-arg {item!r} is not NAME=VALUE: e.g. --model-arg num_classes=150")
        try:
            args[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            args[key] = text
    return args


def load_for_export(
    name: str, checkpoint: Path, plan: str | None = None, model_args: dict[str, Any] | None = None
) -> nn.Module:
    """Build registered model ``name`` with the arguments ``checkpoint`` records (a run's checkpoint; else the
    builder's defaults), updated by ``model_args``; load its weights and PyConv plans, and set the plan mode:
    ``plan``, else the one the run trained with, else ``"auto"``. In eval mode, on the CPU."""
    entry = model_entry(name)
    if entry.task not in EXPORT_TASKS:
        raise ValueError(f"model {name!r} is a {entry.task} model; export takes {' or '.join(EXPORT_TASKS)} models")
    state = load_checkpoint(checkpoint)
    if not isinstance(state, dict):
        raise CheckpointMismatchError(
            f"--weights {checkpoint} holds a {type(state).__name__}, not a checkpoint or "
            f"state_dict: save one with torch.save(model.state_dict(), path)"
        )
    recorded = state.get("model_args")
    args: dict[str, Any] = {}
    if isinstance(recorded, dict):
        if recorded.get("name") != name:
            raise CheckpointMismatchError(
                f"--weights {checkpoint} holds a {recorded.get('name')} ({recorded}), "
                f"not a {name}: export {recorded.get('name')}, or pass weights of a {name}"
            )
        # the backbone's starting weights: the checkpoint replaces them (and their file may be gone)
        args = {k: v for k, v in recorded.items() if k not in ("name", "backbone_weights")}
    args.update(model_args or {})
    try:
        model = build(name, **args)
    except TypeError as err:
        raise ValueError(f"model {name} does not take the arguments {args} ({err}): fix --model-arg") from None
    try:
        load_model_weights(model, checkpoint)
    except CheckpointMismatchError as err:
        if isinstance(recorded, dict) or model_args:
            raise
        raise CheckpointMismatchError(
            f"{err} This checkpoint records no model arguments: give the model's, e.g. --model-arg num_classes=150"
        ) from None
    config = state.get("config")
    set_pyconv_plan(model, plan or (config.get("pyconv_plan") if isinstance(config, dict) else None) or "auto")
    return model.eval()


def freeze_pyconv_plans(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[str, str]]:
    """Give every PyConv of ``model`` the fixed plan it computes ``example`` with, so that a traced graph
    holds it (under ``"auto"`` a trace would fall back on a recorded choice or the naive plan): a fixed plan
    or ``"naive"`` as set; under ``"auto"`` the run's choice for this input's signature, else its latest
    evaluation (then training) choice, else the fastest plan measured now. Returns, per PyConv, the plan and
    where it came from ("set", "recorded" or "measured")."""
    frozen: dict[str, tuple[str, str]] = {}

    def fix(name: str, module: PyConv, x: torch.Tensor) -> None:
        if module.plan != "auto":
            frozen[name] = (format_plan(module.current_plan(x)), "set")
        else:
            earlier = module.chosen(training=False) or module.chosen(training=True)
            recorded = module.choices.get(signature(x, training=False)) or (earlier[-1] if earlier else None)
            frozen[name] = (recorded, "recorded") if recorded else (format_plan(module.current_plan(x)), "measured")
        module.plan = frozen[name][0]

    hooks = [
        m.register_forward_pre_hook(lambda module, args, name=name: fix(name, module, args[0]))
        for name, m in model.named_modules()
        if isinstance(m, PyConv)
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return frozen


def _require_onnx() -> None:
    missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ImportError(
            f"--format onnx needs the packages {', '.join(missing)}: pip install -e '.[export]' "
            f"(or pip install {' '.join(ONNX_PACKAGES)}), or use --format torch_export"
        )


def _dynamic_batch() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)


def export_model(model: nn.Module, example: torch.Tensor, fmt: str, out: Path) -> None:
    """Trace ``model`` on ``example`` (batch size left free) and write the graph to ``out`` atomically."""
    buffer = io.BytesIO()
    if fmt == "torch_export":
        torch.export.save(torch.export.export(model, (example,), dynamic_shapes=_dynamic_batch()), buffer)
    elif fmt == "onnx":
        _require_onnx()
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=_dynamic_batch(),
            input_names=["images"],
            output_names=["logits"],
            verbose=False,
        )
        assert program is not None  # the dynamo exporter always returns its program
        buffer.write(program.model_proto.SerializeToString())
    else:
        raise ValueError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    write_atomic(out, buffer.getvalue())


def _run_exported(fmt: str, path: Path, x: torch.Tensor) -> torch.Tensor:
    if fmt == "torch_export":
        with torch.no_grad():
            return torch.export.load(path).module()(x)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(np.asarray(output))


def check_export(model: nn.Module, fmt: str, path: Path, shape: Sequence[int], tolerance: float) -> tuple[float, float]:
    """Load ``path`` back, run it and the eager ``model`` on one random batch of ``shape``: the largest
    absolute difference and the bound it met (``tolerance`` times ``max(1, max |output|)``); an
    :class:`ExportCheckError` if it exceeds that bound."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    got = _run_exported(fmt, path, x)
    if got.shape != expected.shape:
        raise ExportCheckError(f"{path} returns shape {tuple(got.shape)}, the eager model {tuple(expected.shape)}")
    diff, bound = (got - expected).abs().max().item(), tolerance * max(1.0, expected.abs().max().item())
    if not diff <= bound:
        raise ExportCheckError(
            f"{path} differs from the eager model by up to {diff:.3g} on a random batch, more "
            f"than the tolerance {bound:.3g}: the export is not faithful (file removed); report it, "
            f"or try --plan naive"
        )
    return diff, bound


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pyconv_core.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="registered model name (pyconv_core.list_models()), e.g. pyconvresnet50")
    parser.add_argument(
        "--weights", required=True, help="a run folder (its best.pt, else last.pt) or a checkpoint file (.pt/.pth)"
    )
    parser.add_argument(
        "--format",
        choices=tuple(FORMATS),
        default="torch_export",
        help="torch_export: a torch.export program (.pt2, torch.export.load); onnx: an ONNX graph "
        "(.onnx), checked with onnxruntime (default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, help="where to write the graph (default: beside the checkpoint, e.g. runs/<name>/best.onnx)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        help="height and width of the graph's input (default: the model's registered input size, "
        "224 for classification, 473 for segmentation)",
    )
    parser.add_argument(
        "--batch", type=int, default=2, help="batch size traced; the graph takes any batch size (default: %(default)s)"
    )
    parser.add_argument(
        "--plan",
        help="PyConv plan mode to export with: auto, naive or a partition such as 0|123 (default: "
        "the one the run trained with, else auto)",
    )
    parser.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a builder argument, repeatable: needed for a checkpoint that does not record them (a "
        "plain state_dict, the authors' file), e.g. num_classes=150 backbone=pyconvresnet "
        "output_stride=16; overrides a recorded one (default: the run's, else the builder's)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest difference from the eager model allowed, times max(1, max |output|) (default: %(default)s)",
    )
    return parser


def _describe(plans: dict[str, tuple[str, str]]) -> str:
    if not plans:
        return "no PyConv layers"
    counts = Counter(plan for plan, _ in plans.values())
    words = {"set": "set by the plan mode", "recorded": "recorded by the run", "measured": "measured now"}
    sources = Counter(words[source] for _, source in plans.values())
    return (
        f"{len(plans)} PyConv layers computing with plans "
        + ", ".join(f"{p} x{n}" for p, n in counts.items())
        + " ("
        + ", ".join(f"{n} {s}" for s, n in sources.items())
        + ")"
    )


def main(argv: Sequence[str] | None = None) -> ExportResult:
    """The command line: load, freeze the PyConv plans, write the graph, reload and check it; prints each step."""
    args = _parser().parse_args(argv)
    try:
        if args.batch < 1 or (args.image_size is not None and args.image_size < 1) or not args.tolerance > 0:
            raise ValueError(
                f"--batch and --image-size must be at least 1 and --tolerance above 0, got {args.batch}, "
                f"{args.image_size} and {args.tolerance}"
            )
        checkpoint = resolve_weights(args.weights)
        model = load_for_export(args.model, checkpoint, args.plan, parse_model_args(args.model_arg))
        sample = model_entry(args.model).input_shape
        side = args.image_size or sample[-1]
        shape = (args.batch, sample[0], side, side)
        plans = freeze_pyconv_plans(model, torch.randn(*shape))
        print(f"{args.model} from {checkpoint}: {_describe(plans)}")
        out = args.out or checkpoint.with_suffix(FORMATS[args.format])
        export_model(model, torch.randn(*shape), args.format, out)
        print(
            f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB): input [batch, {sample[0]}, {side}, {side}], "
            f"batch 1 to {MAX_BATCH}"
        )
        try:
            diff, bound = check_export(model, args.format, out, (args.batch + 1, *shape[1:]), args.tolerance)
        except ExportCheckError:
            out.unlink()
            raise
        runtime = "onnxruntime" if args.format == "onnx" else "torch.export.load"
        print(
            f"checked with {runtime} on a random batch of {args.batch + 1}: max abs diff from the eager model "
            f"{diff:.3g} <= {bound:.3g} (tolerance {args.tolerance:g} x max(1, max |output|))"
        )
        return ExportResult(out, diff, bound, {name: plan for name, (plan, _) in plans.items()})
    except (ValueError, OSError, ImportError, ExportCheckError) as err:  # their message says the fix
        if os.environ.get("PYCONV_TRACEBACK") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
