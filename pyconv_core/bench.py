"""Training and inference speed of registered (or torchvision) models, as ratios to a baseline.

``python -m pyconv_core.bench --models pyconvresnet50 resnet50 --batch 8 --size 224``

Reproduces S-Table 5's running-time comparison (latency in s/batch, throughput in img/s) in
one process: every (model, mode) pair is warmed up, then the timed repeats visit the pairs in
turn (round robin), so a load change on a shared machine hits every model alike; each repeat
times whole steps between device synchronisations and the median repeat is reported. A
training step is the authors' (iduta/pyconv ``main.py``): forward, cross-entropy, zero_grad,
backward, SGD step with momentum and weight decay. Ratios are throughput over the baseline's
(default torchvision's resnet50; >1 is faster) at the same batch, size, dtype and layout.
The process CPU time per step is recorded too, with its own ratio: on a shared CPU, where
other processes take turns on the cores, it is steadier than the wall clock (use --threads 1).
Video models (registered ``input_shape`` with frames) take clips of ``--frames`` x size x size.
``--loader TASK ...`` times the tasks' training loaders alone instead (``pyconv_core/loader_bench.py``).
The results go to the terminal as a table and to ``runs/bench/<name>.json`` with the machine,
the versions, the settings and the command line. Options that change how a model computes
(an execution plan, a fused kernel) enter as a :data:`SetupHook` given to ``run_bench`` / ``main``,
applied to every model after the move to the device and before ``torch.compile``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pyconv_core.layers import factory
from pyconv_core.layers.plans import candidate_plans, format_plan, mac_ratio, max_mac_ratio_for, naive_plan, time_plan
from pyconv_core.layers.pyconv import PyConv, set_pyconv_plan
from pyconv_core.loader_bench import LOADER_TASKS, format_loader_table, loader_bench
from pyconv_core.profile import count_params
from pyconv_core.registry import build, model_entry

__all__ = [
    "BenchSettings",
    "Candidate",
    "SetupHook",
    "is_video",
    "make_candidate",
    "run_bench",
    "add_ratios",
    "default_baseline",
    "format_table",
    "layer_bench",
    "format_layer_table",
    "machine_info",
    "main",
]

TORCHVISION_PREFIX = "tv:"
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BenchSettings:
    """What every model is measured at (recorded in the JSON)."""

    batch: int = 8
    size: int = 224
    frames: int = 16
    modes: tuple[str, ...] = ("train", "infer")
    device: str = "cpu"
    amp: str | None = None
    channels_last: bool = False
    compile: str | None = None
    repeats: int = 5
    warmup: int = 2
    iters: int = 0
    num_classes: int | None = None


@dataclass
class Candidate:
    """One model to time: its spec (registered name or ``tv:<name>``, ``@plan`` for a PyConv
    execution plan), module and one sample's shape."""

    spec: str
    model: nn.Module
    sample_shape: tuple[int, ...]
    params: int


# A per-model setup step run after the move to the device and before compiling, e.g. choosing
# an execution plan; it returns the model to time (the same module, or one wrapping it).
SetupHook = Callable[[nn.Module, BenchSettings], nn.Module]


def _torchvision_name(spec: str) -> str | None:
    return spec[len(TORCHVISION_PREFIX) :] if spec.startswith(TORCHVISION_PREFIX) else None


def is_video(spec: str) -> bool:
    """Whether ``spec`` takes clips (channels, frames, height, width) rather than images."""
    spec = spec.partition("@")[0]
    name = _torchvision_name(spec)
    if name is None:
        return len(model_entry(spec).input_shape) == 4
    return name in torchvision.models.list_models(module=torchvision.models.video)


def _has_pyconv(spec: str) -> bool:
    """Whether registered model ``spec`` has PyConv layers of more than one level, i.e. execution plans to choose
    (a baseline ResNet's 3x3 convolutions are one-level PyConvs; built on the meta device: no memory)."""
    if _torchvision_name(spec) is not None:
        return False
    with torch.device("meta"):
        return any(isinstance(m, PyConv) and len(m.levels) > 1 for m in build(spec).modules())


def make_candidate(spec: str, settings: BenchSettings) -> Candidate:
    """Build ``spec`` (a registered name, or ``tv:<name>`` for torchvision) with its input shape;
    ``name@plan`` sets the PyConv execution plan (``naive``, ``auto`` or a partition like ``0|123``)."""
    spec, _, plan = spec.partition("@")
    name = _torchvision_name(spec)
    classes = {} if settings.num_classes is None else {"num_classes": settings.num_classes}
    if name is None:
        model, channels = build(spec, **classes), model_entry(spec).input_shape[0]
    elif name in torchvision.models.list_models():
        model, channels = torchvision.models.get_model(name, weights=None, **classes), 3
    else:
        close = difflib.get_close_matches(name, torchvision.models.list_models(), n=3)
        hint = f"did you mean {', '.join(f'tv:{c}' for c in close)}? " if close else ""
        raise ValueError(
            f"unknown torchvision model {name!r} in {spec!r}; {hint}see torchvision.models.list_models() for the names"
        )
    if plan:
        set_pyconv_plan(model, plan)
        spec = f"{spec}@{plan}"
    side = (settings.size, settings.size)
    shape = (channels, settings.frames, *side) if is_video(spec.partition("@")[0]) else (channels, *side)
    return Candidate(spec, model, shape, count_params(model))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Runner:
    """One (model, mode) pair with its input, optimizer and step function."""

    def __init__(
        self, candidate: Candidate, model: nn.Module, mode: str, settings: BenchSettings, device: torch.device
    ) -> None:
        self.candidate, self.model, self.mode, self.device = candidate, model, mode, device
        self.amp = _AMP_DTYPES.get(settings.amp) if settings.amp else None
        x = torch.randn(settings.batch, *candidate.sample_shape, device=device)
        dim = len(candidate.sample_shape) - 1  # spatial (and temporal) axes
        self.x = x.contiguous(memory_format=factory.channels_last(dim)) if settings.channels_last else x
        # any valid class index will do (every classifier has at least 2); timing does not depend on it
        self.y = torch.randint(0, settings.num_classes or 2, (settings.batch,), device=device)
        self.steps = settings.iters
        self.latencies: list[float] = []
        self.cpu_times: list[float] = []
        if mode == "train":
            self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
            self.scaler = torch.amp.GradScaler(device.type, enabled=settings.amp == "fp16")

    def _forward(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            out = self.model(self.x)
        if not (isinstance(out, torch.Tensor) and out.dim() == 2):
            raise ValueError(
                f"{self.candidate.spec}: the bench times classifiers, whose output is [batch, classes]; "
                f"got {type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}"
            )
        return out

    def step(self) -> None:
        if self.mode == "infer":
            self.model.eval()
            with torch.inference_mode():
                self._forward()
            return
        self.model.train()
        loss = F.cross_entropy(self._forward().float(), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def time(self, steps: int) -> tuple[float, float]:
        """Wall and process CPU seconds per step over ``steps`` steps, between device synchronisations."""
        _sync(self.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step()
        _sync(self.device)
        return (time.perf_counter() - start) / steps, (time.process_time() - cpu_start) / steps


def _prepare(
    candidate: Candidate, settings: BenchSettings, device: torch.device, setup: Sequence[SetupHook]
) -> nn.Module:
    model = candidate.model.to(device)
    if settings.channels_last:
        model = model.to(memory_format=factory.channels_last(len(candidate.sample_shape) - 1))
    for hook in setup:
        model = hook(model, settings)
    if settings.compile:
        if any(isinstance(m, PyConv) and m.plan == "auto" for m in model.modules()):
            _tune_eagerly(model, candidate, settings, device)
        model = cast(nn.Module, torch.compile(model, mode=None if settings.compile == "default" else settings.compile))
    return model


def _tune_eagerly(model: nn.Module, candidate: Candidate, settings: BenchSettings, device: torch.device) -> None:
    """Let ``auto`` PyConv plans measure themselves in eager mode (compiled code reuses the choices)."""
    for mode in settings.modes:
        _Runner(candidate, model, mode, settings, device).step()


def run_bench(
    specs: Sequence[str], settings: BenchSettings, setup: Sequence[SetupHook] = (), log: Callable[[str], None] = print
) -> list[dict]:
    """Time every spec in every mode; one result row per (spec, mode), in the order given."""
    device = torch.device(settings.device)
    if settings.amp is not None and settings.amp not in _AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(_AMP_DTYPES)} or None, got {settings.amp!r}")
    if any(m not in ("train", "infer") for m in settings.modes):
        raise ValueError(f"modes must be 'train' and/or 'infer', got {settings.modes}")
    torch.backends.cudnn.benchmark = True  # as in the authors' timing runs (iduta/pyconv main.py)
    runners = []
    for spec in dict.fromkeys(specs):
        candidate = make_candidate(spec, settings)
        model = _prepare(candidate, settings, device, setup)
        runners += [_Runner(candidate, model, mode, settings, device) for mode in settings.modes]
    for runner in runners:
        log(f"warm-up {runner.candidate.spec} {runner.mode}")
        for _ in range(max(settings.warmup - 1, 0)):
            runner.step()
        last, _ = runner.time(1)
        runner.steps = runner.steps or max(1, round(0.25 / last))
    for repeat in range(settings.repeats):
        for runner in runners:
            wall, cpu = runner.time(runner.steps)
            runner.latencies.append(wall)
            runner.cpu_times.append(cpu)
        log(f"repeat {repeat + 1}/{settings.repeats} done")
    rows = []
    for runner in runners:
        times = runner.latencies
        latency = statistics.median(times)
        rows.append(
            {
                "model": runner.candidate.spec,
                "mode": runner.mode,
                "batch": settings.batch,
                "input_shape": [settings.batch, *runner.candidate.sample_shape],
                "params": runner.candidate.params,
                "steps_per_repeat": runner.steps,
                "latency_s": latency,
                "throughput": settings.batch / latency,
                "latencies_s": times,
                "spread": (max(times) - min(times)) / latency,
                "cpu_s": statistics.median(runner.cpu_times),
                "cpu_times_s": runner.cpu_times,
                "pyconv_plans": _plan_counts(runner.candidate.model, runner.mode),
            }
        )
    return rows


def _plan_counts(model: nn.Module, mode: str) -> dict[str, int]:
    """How many PyConv layers ran each plan in ``mode`` (auto's choices, or the fixed plan)."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, PyConv) and len(m.levels) > 1:
            for plan in m.chosen(mode == "train") if m.plan == "auto" else [m.plan]:
                counts[plan] = counts.get(plan, 0) + 1
    return counts


def add_ratios(rows: list[dict], baseline: str) -> list[dict]:
    """Set ``ratio`` = throughput / the baseline's in the same mode, and ``cpu_ratio`` = the same from
    process CPU time (steadier than wall time on a shared CPU); None where there is no baseline
    row, or where the baseline takes images and the model clips (or the reverse)."""
    base = {r["mode"]: r for r in rows if r["model"] == baseline}
    for r in rows:
        reference = base.get(r["mode"])
        if reference is None or len(reference["input_shape"]) != len(r["input_shape"]):
            r["ratio"] = r["cpu_ratio"] = None
            continue
        r["ratio"] = r["throughput"] / reference["throughput"]
        r["cpu_ratio"] = reference["cpu_s"] / r["cpu_s"] if r["cpu_s"] > 0 else None
    return rows


def layer_bench(spec: str, settings: BenchSettings, log: Callable[[str], None] = print) -> list[dict]:
    """Per-layer times of every candidate plan of every distinct PyConv layer of ``spec`` (inputs as the
    network feeds them at ``settings``), beside a plain 3x3 (3x3x3) convolution of the same shape.
    ``train_ms``: forward + backward to input and weights; ``infer_ms``: forward without autograd."""
    device = torch.device(settings.device)
    candidate = make_candidate(spec, settings)
    model = _prepare(candidate, dataclasses.replace(settings, compile=None), device, ())
    inputs: dict[tuple, tuple[str, PyConv, torch.Tensor, int]] = {}  # (levels, input shape) -> first layer, count

    def record(module: PyConv, args: tuple, name: str) -> None:
        x = args[0]
        key = (module.extra_repr(), tuple(x.shape))
        name, module, x, count = inputs.get(key, (name, module, x.detach().clone(), 0))
        inputs[key] = (name, module, x, count + 1)

    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: record(mod, args, name))
        for name, m in model.named_modules()
        if isinstance(m, PyConv) and len(m.levels) > 1
    ]
    with torch.no_grad():
        _Runner(candidate, model, "infer", settings, device)._forward()
    for h in handles:
        h.remove()
    amp = _AMP_DTYPES.get(settings.amp) if settings.amp else None
    rows = []
    for (desc, shape), (name, layer, x, count) in inputs.items():
        convs = [copy.deepcopy(c) for c in layer.convs]
        first = convs[0]
        layer_out = sum(c.out_channels for c in convs)
        plain = factory.conv(
            layer.dim, first.in_channels, layer_out, 3, stride=first.stride, dilation=first.dilation
        ).to(device)
        timed = [("plain conv", [plain], naive_plan(1), 0.0)]
        timed += [
            (format_plan(p), convs, p, mac_ratio(convs, p)) for p in candidate_plans(convs, max_mac_ratio_for(device))
        ]
        log(f"layers: {spec} {name} {list(shape)}: {len(timed)} plans")
        times = {}
        for label, levels, plan, macs in timed:
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                with torch.enable_grad():
                    train = time_plan(x.requires_grad_(True), levels, plan, True, settings.repeats)
                with torch.inference_mode():
                    infer = time_plan(x.detach(), levels, plan, False, settings.repeats)
            times[label] = (train, infer, macs)
        plain_train, plain_infer, _ = times["plain conv"]
        for label, (train, infer, macs) in times.items():
            rows.append(
                {
                    "model": spec,
                    "layer": name,
                    "count": count,
                    "levels": desc,
                    "input_shape": list(shape),
                    "out_channels": layer_out,
                    "plan": label,
                    "mac_ratio": macs or None,
                    "train_ms": 1e3 * train,
                    "infer_ms": 1e3 * infer,
                    "train_vs_plain": plain_train / train,
                    "infer_vs_plain": plain_infer / infer,
                }
            )
    return rows


def format_layer_table(rows: list[dict]) -> str:
    """:func:`layer_bench` rows as text, fastest training plan per layer marked with ``*``."""
    best: dict[tuple[str, str], dict] = {}
    for r in rows:
        if r["plan"] != "plain conv":
            key = (r["model"], r["layer"])
            best[key] = min(best.get(key, r), r, key=lambda v: v["train_ms"])
    header = (
        f"{'layer':<34}{'n':>3}{'input':>18}{'plan':>14}{'MACs':>6}{'train ms':>10}{'infer ms':>10}"
        f"{'train/plain':>12}{'infer/plain':>12}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        mark = "*" if best.get((r["model"], r["layer"])) is r else " "
        macs = "-" if r["mac_ratio"] is None else f"{r['mac_ratio']:.2f}"
        lines.append(
            f"{r['model'] + ':' + r['layer']:<34}{r['count']:>3}{'x'.join(map(str, r['input_shape'])):>18}"
            f"{r['plan'] + mark:>14}{macs:>6}{r['train_ms']:>10.2f}{r['infer_ms']:>10.2f}"
            f"{1 / r['train_vs_plain']:>12.2f}{1 / r['infer_vs_plain']:>12.2f}"
        )
    return "\n".join(lines)


def default_baseline(specs: Sequence[str]) -> str:
    """torchvision's resnet50, or its r3d_18 when every model is a video model."""
    return "tv:r3d_18" if all(is_video(s) for s in specs) else "tv:resnet50"


def machine_info(device: str) -> dict:
    """The machine and software the figures were measured on."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    if torch.device(device).type == "cuda":
        info.update(
            gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version()
        )
    return info


def format_table(rows: list[dict], baseline: str) -> str:
    """The result rows as a fixed-width text table (ratios: wall-clock, then process CPU time)."""

    def ratio(v):
        return "-" if v is None else f"{v:.3f}"

    title = f"vs {baseline}"
    width = max(len(title) + 2, 16)
    header = (
        f"{'model':<22}{'mode':>6}{'input':>20}{'params(M)':>10}{'s/batch':>10}{'img/s':>9}"
        f"{'spread':>8}{title:>{width}}{'(cpu time)':>11}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['model']:<22}{r['mode']:>6}{'x'.join(map(str, r['input_shape'])):>20}"
            f"{r['params'] / 1e6:>10.2f}{r['latency_s']:>10.4f}{r['throughput']:>9.2f}"
            f"{r['spread']:>8.1%}{ratio(r['ratio']):>{width}}{ratio(r['cpu_ratio']):>11}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command-line options (see ``python -m pyconv_core.bench --help``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="registered names or tv:<torchvision name>")
    parser.add_argument(
        "--loader",
        nargs="+",
        metavar="TASK",
        choices=LOADER_TASKS,
        help="instead of models, time these tasks' training loaders alone at the paper's sizes "
        "(items/s per --workers count; pyconv_core/loader_bench.py)",
    )
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2], help="DataLoader workers (--loader)")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per loader (--loader)")
    parser.add_argument("--loader-items", type=int, default=64, help="images or videos generated per task (--loader)")
    parser.add_argument("--loader-dir", default="data/bench", help="folder of the generated data (--loader)")
    parser.add_argument("--baseline", help="spec the ratios refer to (default tv:resnet50; tv:r3d_18 for video)")
    parser.add_argument("--batch", type=int, default=8, help="images or clips per step")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels (299 for the Inception nets)")
    parser.add_argument("--frames", type=int, default=16, help="clip length for video models")
    parser.add_argument("--mode", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=sorted(_AMP_DTYPES), help="autocast dtype (fp16 adds a GradScaler)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC / NDHWC memory format")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        metavar="MODE",
        help="torch.compile the models (optionally a mode such as max-autotune)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per (model, mode); median reported")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the repeats (the last sizes --iters 0)")
    parser.add_argument("--iters", type=int, default=0, help="steps per repeat (0: enough for ~0.25 s each)")
    parser.add_argument("--num-classes", type=int, help="classifier outputs (default: each model's own)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--pyconv-plan",
        nargs="+",
        metavar="PLAN",
        help="time every model with PyConv layers once per plan (auto, naive, or a partition "
        "like 0|123), as MODEL@PLAN; default: each model's own (naive)",
    )
    parser.add_argument(
        "--layers",
        action="store_true",
        help="also time every candidate plan of every distinct PyConv layer of the models",
    )
    parser.add_argument("--name", help="JSON file name under --out-dir (default: a timestamp)")
    parser.add_argument("--out-dir", default="runs/bench", help="folder of the JSON results")
    args = parser.parse_args(argv)
    if not args.models and not args.loader:
        parser.error("give --models (model speed) or --loader (input pipeline speed)")
    if any(count < 0 for count in args.workers):
        parser.error(f"--workers must be >= 0, got {args.workers}")
    for flag in ("batch", "size", "frames", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    return args


def main(argv: Sequence[str] | None = None, setup: Sequence[SetupHook] = ()) -> dict:
    """Run the bench from command-line arguments; returns (and writes) the JSON record."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = datetime.now()
    record = {
        "name": args.name or started.strftime("%Y%m%d-%H%M%S"),
        "started": started.isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "pyconv_core.bench", *argv]),
        "machine": machine_info(args.device),
    }
    if args.loader:
        rows = loader_bench(args.loader, args.workers, args.batch, args.loader_items, args.seconds, args.loader_dir)
        return _write(record | {"loaders": rows}, args.out_dir, format_loader_table(rows))
    settings = BenchSettings(
        batch=args.batch,
        size=args.size,
        frames=args.frames,
        modes=tuple(args.mode),
        device=args.device,
        amp=args.amp,
        channels_last=args.channels_last,
        compile=args.compile,
        repeats=args.repeats,
        warmup=args.warmup,
        iters=args.iters,
        num_classes=args.num_classes,
    )
    baseline = args.baseline or default_baseline(args.models)
    models = [
        f"{spec}@{plan}" if args.pyconv_plan and _has_pyconv(spec) else spec
        for spec in args.models
        for plan in (args.pyconv_plan or [None])
    ]
    models = list(dict.fromkeys(models))
    layers = (
        [
            row
            for spec in dict.fromkeys(m.partition("@")[0] for m in models)
            if _has_pyconv(spec)
            for row in layer_bench(spec, settings)
        ]
        if args.layers
        else []
    )
    rows = add_ratios(run_bench([*models, baseline], settings, setup), baseline)
    table = (
        (format_layer_table(layers) + "\n\n" if layers else "")
        + format_table(rows, baseline)
        + (
            f"\n\n{settings.device}, batch {settings.batch}, amp {settings.amp}, "
            f"channels_last {settings.channels_last}, compile {settings.compile}; medians of {settings.repeats} repeats"
        )
    )
    return _write(
        record | {"settings": asdict(settings), "baseline": baseline, "results": rows, "layers": layers},
        args.out_dir,
        table,
    )


def _write(record: dict, out_dir: str, table: str) -> dict:
    """Write ``record`` to ``<out_dir>/<name>.json`` and print ``table`` and the path; return the record."""
    path = Path(out_dir) / f"{record['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"{table}\n-> {path}")
    return record


if __name__ == "__main__":
    main()
