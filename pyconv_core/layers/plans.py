"""Execution plans of the PyConv layer: how its forward is computed, never what it computes.

A plan partitions the levels of a PyConv into *parts*; each part runs as one convolution. A part
of one level is that level's own convolution (the naive plan: every level alone, then concat).
A part of several levels is one grouped convolution whose kernel is the levels' largest kernel
(the smaller ones zero-padded around their centre) and whose group count is the gcd of theirs
(each level's groups become zero blocks inside the merged groups), built on the fly from the
levels' own weights, so parameters, checkpoints, gradients and optimizer state are untouched.
Merging costs extra MACs on zeros but replaces several small convolutions that use the hardware
badly (few channels per group, large kernels) by one that uses it better: whether it pays depends
on shape, dtype and device, so :func:`tune` measures every candidate (forward, plus backward
when training) on the actual input once and caches the fastest, like ``cudnn.benchmark``.

For 3D layers a plan may also compute its parts by *temporal taps*: a ``kt x kh x kw`` convolution
is ``kt`` grouped 2D convolutions over the frames, shifted in time and summed. All taps run as one
2D convolution over the N*T frames (a channels_last_3d clip is already a channels_last batch of
frames), whose outputs are then summed with the taps' time shifts: same MACs, but the 2D grouped
kernels of CPU backends are far faster than their 3D ones (BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F

from pyconv_core.layers import factory
from pyconv_core.layers.factory import ConvNd

__all__ = [
    "Plan",
    "naive_plan",
    "parse_plan",
    "format_plan",
    "partitions",
    "all_plans",
    "mac_ratio",
    "candidate_plans",
    "max_mac_ratio_for",
    "run_plan",
    "signature",
    "time_plan",
    "tune",
    "PLAN_CACHE",
    "MAX_MAC_RATIO",
    "machine_key",
    "plan_cache_path",
]

Partition = tuple[tuple[int, ...], ...]  # of the level indices; each part runs as one convolution
TAPS_PREFIX = "taps:"


@dataclass(frozen=True)
class Plan:
    """How a PyConv computes: ``parts`` partition its levels, each part one convolution; with
    ``temporal_taps`` (3D only) each part's convolution runs as 2D convolutions over the frames."""

    parts: Partition
    temporal_taps: bool = False

    def __str__(self) -> str:
        return format_plan(self)


# Candidates doing more than this many times the naive MACs are not timed, per device type: a CPU pays for
# every MAC, while a GPU's tensor cores can run a dense merge of several levels (up to 12x the MACs of a
# PyConv4) faster than cuDNN's grouped kernels with few channels per group.
MAX_MAC_RATIO = {"cpu": 4.0, "cuda": 16.0}
PLAN_CACHE: dict[tuple, Plan] = {}  # (layer, input signature, MAC bound) -> fastest plan, per process
_STORED: dict[Path, dict[str, str]] = {}  # plan cache files read by this process
_CONV_FN = {2: F.conv2d, 3: F.conv3d}


def naive_plan(num_levels: int) -> Plan:
    """Every level alone: the authors' implementation."""
    return Plan(tuple((i,) for i in range(num_levels)))


def parse_plan(text: str) -> Plan:
    """``"0|123"`` -> parts ``((0,), (1, 2, 3))``; ``"taps:0|123"`` the same by temporal taps
    (level indices are single digits). ValueError for anything else."""
    taps = text.startswith(TAPS_PREFIX)
    return Plan(tuple(tuple(int(c) for c in part) for part in text.removeprefix(TAPS_PREFIX).split("|")), taps)


def format_plan(plan: Plan) -> str:
    """Parts ``((0,), (1, 2, 3))`` -> ``"0|123"`` (``"taps:0|123"`` by temporal taps)."""
    return (TAPS_PREFIX if plan.temporal_taps else "") + "|".join("".join(str(i) for i in p) for p in plan.parts)


def partitions(num_levels: int) -> list[Partition]:
    """All partitions of ``range(num_levels)`` into parts (15 for four levels), parts in level order."""
    plans: list[list[list[int]]] = [[]]
    for i in range(num_levels):
        plans = [[*p[:j], [*p[j], i], *p[j + 1 :]] for p in plans for j in range(len(p))] + [[*p, [i]] for p in plans]
    return sorted(tuple(tuple(part) for part in p) for p in plans)


def all_plans(convs: Sequence[ConvNd]) -> list[Plan]:
    """Every partition of the levels; for 3D levels each also by temporal taps."""
    modes = (False, True) if len(convs[0].kernel_size) == 3 else (False,)
    return [Plan(parts, taps) for taps in modes for parts in partitions(len(convs))]


def _part_shape(convs: Sequence[ConvNd], part: Sequence[int]) -> tuple[tuple[int, ...], int]:
    """Kernel (largest per axis) and groups (gcd) of the convolution that computes ``part``."""
    kernel = tuple(max(convs[i].kernel_size[d] for i in part) for d in range(len(convs[part[0]].kernel_size)))
    return kernel, math.gcd(*(convs[i].groups for i in part))


def mac_ratio(convs: Sequence[ConvNd], plan: Plan) -> float:
    """MACs of ``plan`` over the naive plan's (same output size for every level)."""

    def macs(out: int, cin: int, kernel: Sequence[int], groups: int) -> float:
        return out * cin / groups * math.prod(kernel)

    naive = sum(macs(c.out_channels, c.in_channels, c.kernel_size, c.groups) for c in convs)
    merged = 0.0
    for part in plan.parts:
        kernel, groups = _part_shape(convs, part)
        merged += macs(sum(convs[i].out_channels for i in part), convs[part[0]].in_channels, kernel, groups)
    return merged / naive


def max_mac_ratio_for(device: torch.device) -> float:
    """The MAC bound of the candidates timed on ``device`` (:data:`MAX_MAC_RATIO`; others: the CPU's)."""
    return MAX_MAC_RATIO.get(device.type, MAX_MAC_RATIO["cpu"])


def candidate_plans(convs: Sequence[ConvNd], max_mac_ratio: float = MAX_MAC_RATIO["cpu"]) -> list[Plan]:
    """The plans worth timing: those within ``max_mac_ratio`` of the naive MACs."""
    return [p for p in all_plans(convs) if mac_ratio(convs, p) <= max_mac_ratio]


def _merged_weight(convs: Sequence[ConvNd], part: Sequence[int], kernel: tuple[int, ...], groups: int) -> torch.Tensor:
    """The weight of one grouped convolution computing the levels of ``part``; output channels in
    group-major order (merged group, level, channel), as a grouped convolution lays them out."""
    cin = convs[part[0]].in_channels
    blocks = []
    for i in part:
        conv = convs[i]
        w, g = conv.weight, conv.groups
        pad = []
        for k, big in zip(reversed(conv.kernel_size), reversed(kernel)):
            pad += [(big - k) // 2] * 2
        w = F.pad(w, pad)
        r, per_group = g // groups, conv.out_channels // g  # level groups per merged group
        eye = torch.eye(r, dtype=w.dtype, device=w.device).view(1, r, 1, r, 1, *[1] * len(kernel))
        w = w.view(groups, r, per_group, 1, cin // g, *kernel) * eye  # block diagonal inside each merged group
        blocks.append(w.reshape(groups, r * per_group, cin // groups, *kernel))
    return torch.cat(blocks, dim=1).flatten(0, 1)


def _temporal_taps_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """``F.conv3d`` computed as one grouped 2D convolution of every temporal tap over the N*T frames,
    then the taps' outputs summed with their time shifts (zero padding in time as in the 3D one)."""
    n, cin, t = x.shape[:3]
    cout, _, kt = weight.shape[:3]
    per_group = cout // groups
    frames = x.permute(0, 2, 3, 4, 1).reshape(n * t, *x.shape[3:], cin).permute(0, 3, 1, 2)  # channels_last
    taps = weight.unflatten(0, (groups, per_group)).movedim(3, 1).flatten(0, 2)  # (group, tap, out) order
    z = F.conv2d(frames, taps, None, stride[1:], padding[1:], dilation[1:], groups)
    h, w = z.shape[-2:]
    z = z.permute(0, 2, 3, 1).reshape(n, t, h, w, groups, kt, per_group)
    z = F.pad(z, (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, padding[0], padding[0]))
    t_out = (t + 2 * padding[0] - dilation[0] * (kt - 1) - 1) // stride[0] + 1
    span = (t_out - 1) * stride[0] + 1
    y = cast(
        torch.Tensor, sum(z[:, d * dilation[0] : d * dilation[0] + span : stride[0], :, :, :, d] for d in range(kt))
    )
    y = y.reshape(n, t_out, h, w, cout)
    if bias is not None:
        y = y + bias
    return y.permute(0, 4, 1, 2, 3)


def _run_part(x: torch.Tensor, convs: Sequence[ConvNd], part: Sequence[int], temporal_taps: bool) -> list[torch.Tensor]:
    """The outputs of the levels of ``part``, each ``[N, out_i, ...]``, computed by one convolution."""
    first = convs[part[0]]
    if len(part) == 1 and not temporal_taps:
        return [first(x)]
    kernel, groups = _part_shape(convs, part)
    padding = tuple(d * (k // 2) for k, d in zip(kernel, first.dilation))
    bias = None
    if first.bias is not None:
        # the levels of a PyConv are built alike: all with a bias, or none
        bias = torch.cat([cast(torch.Tensor, convs[i].bias).view(groups, -1) for i in part], dim=1).flatten()
    weight = first.weight if len(part) == 1 else _merged_weight(convs, part, kernel, groups)
    conv = _temporal_taps_conv if temporal_taps else _CONV_FN[len(kernel)]
    y = conv(x, weight, bias, first.stride, padding, first.dilation, groups)
    if len(part) == 1:
        return [y]
    sizes = [convs[i].out_channels // groups for i in part]
    if groups == 1:
        return list(y.split(sizes, dim=1))
    return [chunk.flatten(1, 2) for chunk in y.unflatten(1, (groups, sum(sizes))).split(sizes, dim=2)]


def run_plan(x: torch.Tensor, convs: Sequence[ConvNd], plan: Plan) -> torch.Tensor:
    """The PyConv output (levels concatenated in order) computed part by part as ``plan`` says, in the
    memory format of ``x``."""
    if len(convs) == 1 and not plan.temporal_taps:
        return convs[0](x)
    outputs: dict[int, torch.Tensor] = {}
    for part in plan.parts:
        outputs.update(zip(part, _run_part(x, convs, part, plan.temporal_taps)))
    y = torch.cat([outputs[i] for i in range(len(convs))], dim=1)
    fmt = _channels_last_format(x)
    return y.contiguous(memory_format=fmt or torch.contiguous_format)


def _channels_last_format(x: torch.Tensor) -> torch.memory_format | None:
    """``channels_last`` (4D) or ``channels_last_3d`` (5D) when ``x`` is laid out so, else None."""
    if x.dim() not in (4, 5) or x.is_contiguous():
        return None
    fmt = factory.channels_last(x.dim() - 2)
    return fmt if x.is_contiguous(memory_format=fmt) else None


def signature(x: torch.Tensor, training: bool) -> str:
    """What a plan's speed depends on besides the layer: shape, dtype, device, memory format, autocast,
    and whether a backward follows (``"[8, 64, 56, 56] float32 cpu channels_last train"``)."""
    fmt = "contiguous" if x.is_contiguous() else "channels_last" if _channels_last_format(x) else "strided"
    amp = (
        f" autocast-{str(torch.get_autocast_dtype(x.device.type)).removeprefix('torch.')}"
        if torch.is_autocast_enabled(x.device.type)
        else ""
    )
    return (
        f"{list(x.shape)} {str(x.dtype).removeprefix('torch.')} {x.device.type} {fmt}{amp} "
        f"{'train' if training else 'eval'}"
    )


def _layer_key(convs: Sequence[ConvNd]) -> tuple:
    return tuple(
        (
            c.in_channels,
            c.out_channels,
            tuple(c.kernel_size),
            c.groups,
            tuple(c.stride),
            tuple(c.dilation),
            c.bias is not None,
        )
        for c in convs
    )


def time_plan(x: torch.Tensor, convs: Sequence[ConvNd], plan: Plan, training: bool, repeats: int) -> float:
    """Median seconds of forward (+ backward to input and weights when training) over ``repeats``."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats + 1):  # the first run warms up (allocations, kernel selection)
        sync()
        tic = time.perf_counter()
        y = run_plan(x, convs, plan)
        if training:
            torch.autograd.grad(y, [x, *(c.weight for c in convs)], torch.ones_like(y))
        sync()
        times.append(time.perf_counter() - tic)
    return sorted(times[1:])[len(times[1:]) // 2]


def tune(
    x: torch.Tensor, convs: Sequence[ConvNd], training: bool, repeats: int = 3, max_mac_ratio: float | None = None
) -> Plan:
    """The fastest candidate plan for these levels on inputs like ``x``: measured on the first call
    for each (layer, :func:`signature`) and cached in :data:`PLAN_CACHE` and in this machine's
    :func:`plan_cache_path` file, so a later process reuses the measurement instead of timing again
    (plans differ in rounding: a second run must not depend on how loaded the machine was). Timing
    runs on copies of the levels and of ``x`` (no RNG drawn, no ``.grad`` or hook of the model touched)."""
    max_mac_ratio = max_mac_ratio_for(x.device) if max_mac_ratio is None else max_mac_ratio
    key = (_layer_key(convs), signature(x, training), max_mac_ratio)
    if key not in PLAN_CACHE:
        stored = _stored_plans().get(repr(key))
        if stored is not None:
            PLAN_CACHE[key] = parse_plan(stored)
        else:
            copies = [copy.deepcopy(c).requires_grad_(training) for c in convs]
            sample = x.detach().clone().requires_grad_(training)
            with torch.enable_grad() if training else torch.no_grad():
                PLAN_CACHE[key] = min(
                    candidate_plans(copies, max_mac_ratio),
                    key=lambda p: time_plan(sample, copies, p, training, repeats),
                )
            _store_plan(repr(key), format_plan(PLAN_CACHE[key]))
    return PLAN_CACHE[key]


def machine_key() -> str:
    """What a measured plan is only valid for: CPU model, architecture, threads, torch build and GPU."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu"
    text = f"{cpu} {platform.machine()} threads={torch.get_num_threads()} torch={torch.__version__} {gpu}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def plan_cache_path() -> Path | None:
    """This machine's file of measured plans: ``$PYCONV_PLAN_CACHE`` (a file; ``off`` keeps plans per
    process only), else ``$XDG_CACHE_HOME/pyconv_core/plans-<machine_key>.json`` (``~/.cache``)."""
    chosen = os.environ.get("PYCONV_PLAN_CACHE", "")
    if chosen == "off":
        return None
    if chosen:
        return Path(chosen)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pyconv_core" / f"plans-{machine_key()}.json"


def _read_plan_file(path: Path) -> dict[str, str]:
    try:
        table = json.loads(path.read_text())
        return table if isinstance(table, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        warnings.warn(
            f"PyConv plan cache {path} is unreadable ({err}); measuring plans again and rewriting it", stacklevel=2
        )
        return {}


def _stored_plans() -> dict[str, str]:
    path = plan_cache_path()
    if path is None:
        return {}
    if path not in _STORED:
        _STORED[path] = _read_plan_file(path)
    return _STORED[path]


def _store_plan(key: str, plan: str) -> None:
    """Add one measurement to the cache file (merged with what other processes wrote meanwhile,
    written to a private temp file and renamed, so concurrent runs never leave half a file)."""
    path = plan_cache_path()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        table = {**_read_plan_file(path), key: plan}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=0, sort_keys=True))
        os.replace(tmp, path)
        _STORED[path] = table
    except OSError as err:
        warnings.warn(
            f"PyConv plan cache {path} cannot be written ({err}); plans stay per process "
            f"(set PYCONV_PLAN_CACHE to a writable file)",
            stacklevel=2,
        )
