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
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Plan", "naive_plan", "parse_plan", "format_plan", "partitions", "mac_ratio", "candidate_plans",
           "run_plan", "signature", "time_plan", "tune", "PLAN_CACHE", "MAX_MAC_RATIO"]

Plan = tuple[tuple[int, ...], ...]  # a partition of the level indices; each part runs as one convolution

MAX_MAC_RATIO = 4.0  # candidates doing more than this many times the naive MACs are not timed
PLAN_CACHE: dict[tuple, Plan] = {}  # (layer signature, input signature) -> fastest plan, per process
_CONV_FN = {2: F.conv2d, 3: F.conv3d}


def naive_plan(num_levels: int) -> Plan:
    """Every level alone: the authors' implementation."""
    return tuple((i,) for i in range(num_levels))


def parse_plan(text: str) -> Plan:
    """``"0|123"`` -> ``((0,), (1, 2, 3))`` (level indices are single digits)."""
    return tuple(tuple(int(c) for c in part) for part in text.split("|"))


def format_plan(plan: Plan) -> str:
    """``((0,), (1, 2, 3))`` -> ``"0|123"``."""
    return "|".join("".join(str(i) for i in part) for part in plan)


def partitions(num_levels: int) -> list[Plan]:
    """All partitions of ``range(num_levels)`` into parts (15 for four levels), parts in level order."""
    plans: list[list[list[int]]] = [[]]
    for i in range(num_levels):
        plans = [[*p[:j], [*p[j], i], *p[j + 1:]] for p in plans for j in range(len(p))] + [[*p, [i]] for p in plans]
    return sorted(tuple(tuple(part) for part in p) for p in plans)


def _part_shape(convs: Sequence[nn.Module], part: Sequence[int]) -> tuple[tuple[int, ...], int]:
    """Kernel (largest per axis) and groups (gcd) of the convolution that computes ``part``."""
    kernel = tuple(max(convs[i].kernel_size[d] for i in part) for d in range(len(convs[part[0]].kernel_size)))
    return kernel, math.gcd(*(convs[i].groups for i in part))


def mac_ratio(convs: Sequence[nn.Module], plan: Plan) -> float:
    """MACs of ``plan`` over the naive plan's (same output size for every level)."""
    def macs(out: int, cin: int, kernel: Sequence[int], groups: int) -> float:
        return out * cin / groups * math.prod(kernel)
    naive = sum(macs(c.out_channels, c.in_channels, c.kernel_size, c.groups) for c in convs)
    merged = 0.0
    for part in plan:
        kernel, groups = _part_shape(convs, part)
        merged += macs(sum(convs[i].out_channels for i in part), convs[part[0]].in_channels, kernel, groups)
    return merged / naive


def candidate_plans(convs: Sequence[nn.Module], max_mac_ratio: float = MAX_MAC_RATIO) -> list[Plan]:
    """The partitions worth timing: those within ``max_mac_ratio`` of the naive MACs."""
    return [p for p in partitions(len(convs)) if mac_ratio(convs, p) <= max_mac_ratio]


def _merged_weight(convs: Sequence[nn.Module], part: Sequence[int], kernel: tuple[int, ...], groups: int) -> torch.Tensor:
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


def _run_part(x: torch.Tensor, convs: Sequence[nn.Module], part: Sequence[int]) -> list[torch.Tensor]:
    """The outputs of the levels of ``part``, each ``[N, out_i, ...]``, computed by one convolution."""
    if len(part) == 1:
        return [convs[part[0]](x)]
    first = convs[part[0]]
    kernel, groups = _part_shape(convs, part)
    padding = tuple(d * (k // 2) for k, d in zip(kernel, first.dilation))
    bias = None
    if first.bias is not None:
        bias = torch.cat([convs[i].bias.view(groups, -1) for i in part], dim=1).flatten()
    y = _CONV_FN[len(kernel)](x, _merged_weight(convs, part, kernel, groups), bias, first.stride, padding,
                              first.dilation, groups)
    sizes = [convs[i].out_channels // groups for i in part]
    if groups == 1:
        return list(y.split(sizes, dim=1))
    return [chunk.flatten(1, 2) for chunk in y.unflatten(1, (groups, sum(sizes))).split(sizes, dim=2)]


def run_plan(x: torch.Tensor, convs: Sequence[nn.Module], plan: Plan) -> torch.Tensor:
    """The PyConv output (levels concatenated in order) computed part by part as ``plan`` says."""
    if len(convs) == 1:
        return convs[0](x)
    outputs: dict[int, torch.Tensor] = {}
    for part in plan:
        outputs.update(zip(part, _run_part(x, convs, part)))
    y = torch.cat([outputs[i] for i in range(len(convs))], dim=1)
    fmt = _channels_last_format(x)
    return y if fmt is None else y.contiguous(memory_format=fmt)


def _channels_last_format(x: torch.Tensor) -> torch.memory_format | None:
    """``channels_last`` (4D) or ``channels_last_3d`` (5D) when ``x`` is laid out so, else None."""
    if x.dim() not in (4, 5) or x.is_contiguous():
        return None
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return fmt if x.is_contiguous(memory_format=fmt) else None


def signature(x: torch.Tensor, training: bool) -> str:
    """What a plan's speed depends on besides the layer: shape, dtype, device, memory format, autocast,
    and whether a backward follows (``"[8, 64, 56, 56] float32 cpu channels_last train"``)."""
    fmt = "contiguous" if x.is_contiguous() else "channels_last" if _channels_last_format(x) else "strided"
    amp = f" autocast-{str(torch.get_autocast_dtype(x.device.type)).removeprefix('torch.')}" \
        if torch.is_autocast_enabled(x.device.type) else ""
    return (f"{list(x.shape)} {str(x.dtype).removeprefix('torch.')} {x.device.type} {fmt}{amp} "
            f"{'train' if training else 'eval'}")


def _layer_key(convs: Sequence[nn.Module]) -> tuple:
    return tuple((c.in_channels, c.out_channels, tuple(c.kernel_size), c.groups, tuple(c.stride),
                  tuple(c.dilation), c.bias is not None) for c in convs)


def time_plan(x: torch.Tensor, convs: Sequence[nn.Module], plan: Plan, training: bool, repeats: int) -> float:
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


def tune(x: torch.Tensor, convs: Sequence[nn.Module], training: bool, repeats: int = 3,
         max_mac_ratio: float = MAX_MAC_RATIO) -> Plan:
    """The fastest candidate plan for these levels on inputs like ``x``: measured on the first call
    for each (layer, :func:`signature`) and cached in :data:`PLAN_CACHE`. Timing runs on copies of
    the levels and of ``x`` (no RNG drawn, no ``.grad`` or hook of the model touched)."""
    key = (_layer_key(convs), signature(x, training))
    if key not in PLAN_CACHE:
        copies = [copy.deepcopy(c).requires_grad_(training) for c in convs]
        sample = x.detach().clone().requires_grad_(training)
        with torch.enable_grad() if training else torch.no_grad():
            PLAN_CACHE[key] = min(candidate_plans(copies, max_mac_ratio),
                                  key=lambda p: time_plan(sample, copies, p, training, repeats))
    return PLAN_CACHE[key]
