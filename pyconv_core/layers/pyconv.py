"""Pyramidal convolution (PyConv), Duta et al. 2020, arXiv 2006.11538, Section 3.

A PyConv with L levels applies L convolutions to the *same* input and concatenates their
outputs along channels, in order of increasing kernel size. Level i has its own kernel
size, number of groups and share of the output channels. One class covers 2D and 3D.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from pyconv_core.engine import distributed
from pyconv_core.engine.checkpoint import EXTRA_STATE_KEY, from_json_tensor, json_tensor
from pyconv_core.layers import factory
from pyconv_core.layers.factory import IntOrTuple
from pyconv_core.layers.plans import Plan, format_plan, naive_plan, parse_plan, run_plan, signature, tune

__all__ = [
    "PyConv",
    "LevelSet",
    "PYCONV_PRESETS",
    "PLAN_MODES",
    "split_channels",
    "check_pyconv_plan",
    "set_pyconv_plan",
    "pyconv_plans",
]

# "auto": the fastest plan per input signature, measured once (layers/plans.py); "naive": the
# authors' per-level convolutions; or an explicit partition such as "0|123" (3D: "taps:0|123" by
# temporal taps) for every PyConv it fits (others run naive).
PLAN_MODES = ("auto", "naive")


@dataclass(frozen=True)
class LevelSet:
    """The levels of one PyConv: kernels, groups and output share (integer parts) per level."""

    kernels: tuple[IntOrTuple, ...]
    groups: tuple[int, ...]
    parts: tuple[int, ...]

    def split(self, out_channels: int) -> list[int]:
        """Output channels per level for a layer of ``out_channels``."""
        return split_channels(out_channels, self.parts)


# docs/paper.md s.1: the stage presets of PyConvResNet (outputs C/4 each, C/4+C/4+C/2, C/2+C/2, C).
PYCONV_PRESETS: dict[str, LevelSet] = {
    "pyconv4": LevelSet(kernels=(3, 5, 7, 9), groups=(1, 4, 8, 16), parts=(1, 1, 1, 1)),
    "pyconv3": LevelSet(kernels=(3, 5, 7), groups=(1, 4, 8), parts=(1, 1, 2)),
    "pyconv2": LevelSet(kernels=(3, 5), groups=(1, 4), parts=(1, 1)),
    "pyconv1": LevelSet(kernels=(3,), groups=(1,), parts=(1,)),
}


def split_channels(channels: int, parts: Sequence[int]) -> list[int]:
    """Divide ``channels`` in proportion to integer ``parts`` (e.g. 64, (1, 1, 2) -> 16, 16, 32)."""
    total = sum(parts)
    if channels % total:
        raise ValueError(
            f"{channels} channels cannot be split in parts {tuple(parts)}: {channels} is not divisible by {total}"
        )
    return [channels // total * p for p in parts]


class PyConv(nn.Module):
    """L parallel convolutions over the same input, concatenated along channels.

    Args:
        in_channels: channels of the input, seen whole by every level.
        out_channels: channels of the concatenated output.
        kernels: kernel size per level (int, or a ``dim``-tuple such as ``(t, k, k)``); odd.
        groups: groups per level.
        split: output channels per level, summing to ``out_channels``; equal shares if omitted.
        stride, dilation: shared by all levels; padding is ``dilation * (k // 2)`` per level.
        dim: 2 for images, 3 for videos.

    The level convolutions are ``self.levels[i]``; ``load_official_checkpoint`` maps them to the
    authors' ``conv2_{i+1}`` names. ``plan`` says how the forward is computed (``layers/plans.py``):
    ``"naive"`` (default), ``"auto"`` or a partition like ``"0|123"`` (3D: ``"taps:0|123"``); ``choices``
    records, per input signature, the plan ``"auto"`` picked. Both travel in the layer's state_dict (its extra
    state), so a checkpoint, a resumed run or a reloaded model computes exactly as before.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernels: Sequence[IntOrTuple],
        groups: Sequence[int],
        split: Sequence[int] | None = None,
        stride: IntOrTuple = 1,
        dilation: IntOrTuple = 1,
        dim: int = 2,
    ) -> None:
        super().__init__()
        kernels, groups = list(kernels), list(groups)
        if split is None:
            split = split_channels(out_channels, [1] * len(kernels))
        split = list(split)
        if not (len(kernels) == len(groups) == len(split)) or not kernels:
            raise ValueError(
                f"PyConv needs one kernel, group count and output split per level; got "
                f"kernels={kernels}, groups={groups}, split={split}"
            )
        if sum(split) != out_channels:
            raise ValueError(f"PyConv output split {split} sums to {sum(split)}, not to out_channels={out_channels}")
        levels = []
        for i, (k, g, o) in enumerate(zip(kernels, groups, split)):
            k = factory.ntuple(k, dim)
            if any(size % 2 == 0 for size in k):
                raise ValueError(
                    f"PyConv level {i}: kernel {k} has an even size; kernels must be odd "
                    f"so that padding dilation*(k//2) keeps the levels aligned"
                )
            if in_channels % g or o % g:
                raise ValueError(
                    f"PyConv level {i}: {in_channels} input and {o} output channels must "
                    f"both be divisible by groups={g}"
                )
            levels.append(factory.conv(dim, in_channels, o, k, stride=stride, dilation=dilation, groups=g))
        self.levels = nn.ModuleList(levels)
        self.dim = dim
        self.plan = "naive"
        self.choices: dict[str, str] = {}

    @property
    def convs(self) -> Sequence[factory.ConvNd]:
        """The level convolutions (``self.levels``), typed as what the factory built."""
        return cast("Sequence[factory.ConvNd]", self.levels)

    @classmethod
    def from_levels(cls, in_channels: int, out_channels: int, levels: LevelSet, **kwargs) -> PyConv:
        """Build from a :class:`LevelSet` (a stage preset), splitting ``out_channels`` by its parts."""
        return cls(in_channels, out_channels, levels.kernels, levels.groups, split=levels.split(out_channels), **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_plan(x, self.convs, self.current_plan(x))

    def current_plan(self, x: torch.Tensor) -> Plan:
        """The plan this input runs with (tuned on first sight of its signature under ``"auto"``)."""
        if self.plan == "naive" or len(self.levels) == 1:
            return naive_plan(len(self.levels))
        if self.plan != "auto":
            plan = parse_plan(self.plan)
            fits = sorted(sum(plan.parts, ())) == list(range(len(self.levels)))
            fits = fits and (self.dim == 3 or not plan.temporal_taps)
            return plan if fits else naive_plan(len(self.levels))
        training = self.training and torch.is_grad_enabled()
        if torch.compiler.is_compiling():  # tuning times eager calls: reuse the last eager choice of this mode
            tuned = self.chosen(training) or self.chosen(True)  # (evaluation falls back to the training choice)
            return parse_plan(tuned[-1]) if tuned else naive_plan(len(self.levels))
        key = signature(x, training)
        if key not in self.choices:
            if training and distributed.world_size() > 1:
                self.choices[key] = self._replicated_training_choice(x)
            else:
                self.choices[key] = format_plan(tune(x, self.convs, training))
        return parse_plan(self.choices[key])

    def _replicated_training_choice(self, x: torch.Tensor) -> str:
        """Under DDP every replica must train with the same plan (plans differ in rounding, and timing
        differs per process): rank 0 tunes on the first training input and broadcasts its choice, which
        then serves every later training signature of this layer. Later signatures (a smaller last batch
        on some ranks) reach ranks at different steps, so they reuse the choice instead of a collective."""
        earlier = self.chosen(training=True)
        if earlier:
            return earlier[-1]
        plan = format_plan(tune(x, self.convs, training=True)) if distributed.is_main() else None
        return cast(str, distributed.broadcast_object(plan))  # rank 0's plan on every rank

    def set_plan(self, plan: str) -> None:
        """Compute with ``plan`` (see :data:`PLAN_MODES`); the choices ``"auto"`` made so far are kept."""
        check_pyconv_plan(plan)
        self.plan = plan

    def awaits_tuning(self) -> bool:
        """Whether ``"auto"`` has yet to time a training input: torch.compile traces the layer without
        timing it, so a compiled run lets it measure in one eager step first."""
        return self.plan == "auto" and not self.chosen(True)

    def get_extra_state(self) -> torch.Tensor:
        """The plan mode and ``choices`` (in the order made: the last training choice serves later signatures
        under DDP), as a tensor (``engine.checkpoint.json_tensor``)."""
        return json_tensor({"plan": self.plan, "choices": self.choices})

    def set_extra_state(self, state: torch.Tensor) -> None:
        """Restore :meth:`get_extra_state`: the layer computes with the plans it had."""
        saved = from_json_tensor(state)
        self.plan, self.choices = saved["plan"], dict(saved["choices"])

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """As ``nn.Module``'s, but a one-level layer (the baseline ResNet's 3x3) has no plan to carry and
        saves none: its network's state_dict keeps torchvision's keys exactly."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if len(self.levels) == 1:
            del destination[prefix + EXTRA_STATE_KEY]

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """As ``nn.Module``'s, but a state_dict without this layer's extra state (the authors' and torchvision's
        files, runs saved before plans moved into the layer) keeps its plans, also under a strict load."""
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + EXTRA_STATE_KEY in missing_keys:
            missing_keys.remove(prefix + EXTRA_STATE_KEY)

    def chosen(self, training: bool) -> list[str]:
        """The plans ``"auto"`` picked so far for training (or evaluation) inputs, oldest first."""
        mode = "train" if training else "eval"
        return [plan for key, plan in self.choices.items() if key.endswith(mode)]

    def extra_repr(self) -> str:
        desc = ", ".join(f"{tuple(c.kernel_size)}/G{c.groups}->{c.out_channels}" for c in self.convs)
        return f"dim={self.dim}, levels=[{desc}], plan={self.plan}"


def check_pyconv_plan(plan: str) -> None:
    """Refuse a plan that is neither one of :data:`PLAN_MODES` nor a partition of level indices."""
    if plan not in PLAN_MODES:
        try:
            parse_plan(plan)
        except ValueError:
            raise ValueError(
                f"unknown PyConv plan {plan!r}: use one of {PLAN_MODES} or a partition of the "
                f"level indices such as '0|123' (3D also 'taps:0|123')"
            ) from None


def set_pyconv_plan(model: nn.Module, plan: str) -> int:
    """Set the execution plan of every PyConv in ``model`` (see :data:`PLAN_MODES`); returns how many.
    Only the computation changes: parameters, outputs and gradients are the same to fp32 rounding."""
    check_pyconv_plan(plan)
    layers = [m for m in model.modules() if isinstance(m, PyConv)]
    for m in layers:
        m.set_plan(plan)
    return len(layers)


def pyconv_plans(model: nn.Module) -> dict[str, dict[str, str]]:
    """The plans ``"auto"`` chose so far, per PyConv (module name) and input signature."""
    return {name: dict(m.choices) for name, m in model.named_modules() if isinstance(m, PyConv) and m.choices}
