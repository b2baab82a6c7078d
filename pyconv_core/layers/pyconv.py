"""Pyramidal convolution (PyConv), Duta et al. 2020, arXiv 2006.11538, Section 3.

A PyConv with L levels applies L convolutions to the *same* input and concatenates their
outputs along channels, in order of increasing kernel size. Level i has its own kernel
size, number of groups and share of the output channels. One class covers 2D and 3D.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pyconv_core.layers import factory
from pyconv_core.layers.factory import IntOrTuple

__all__ = ["PyConv", "LevelSet", "PYCONV_PRESETS", "split_channels"]


@dataclass(frozen=True)
class LevelSet:
    """The levels of one PyConv: kernels, groups and output share (integer parts) per level."""

    kernels: tuple[IntOrTuple, ...]
    groups: tuple[int, ...]
    parts: tuple[int, ...]

    def split(self, out_channels: int) -> list[int]:
        """Output channels per level for a layer of ``out_channels``."""
        return split_channels(out_channels, self.parts)


# SPEC section 1: the stage presets of PyConvResNet (outputs C/4 each, C/4+C/4+C/2, C/2+C/2, C).
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
        raise ValueError(f"{channels} channels cannot be split in parts {tuple(parts)}: "
                         f"{channels} is not divisible by {total}")
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
    authors' ``conv2_{i+1}`` names.
    """

    def __init__(self, in_channels: int, out_channels: int, kernels: Sequence[IntOrTuple],
                 groups: Sequence[int], split: Sequence[int] | None = None, stride: IntOrTuple = 1,
                 dilation: IntOrTuple = 1, dim: int = 2) -> None:
        super().__init__()
        kernels, groups = list(kernels), list(groups)
        if split is None:
            split = split_channels(out_channels, [1] * len(kernels))
        split = list(split)
        if not (len(kernels) == len(groups) == len(split)) or not kernels:
            raise ValueError(f"PyConv needs one kernel, group count and output split per level; got "
                             f"kernels={kernels}, groups={groups}, split={split}")
        if sum(split) != out_channels:
            raise ValueError(f"PyConv output split {split} sums to {sum(split)}, "
                             f"not to out_channels={out_channels}")
        levels = []
        for i, (k, g, o) in enumerate(zip(kernels, groups, split)):
            k = factory.ntuple(k, dim)
            if any(size % 2 == 0 for size in k):
                raise ValueError(f"PyConv level {i}: kernel {k} has an even size; kernels must be odd "
                                 f"so that padding dilation*(k//2) keeps the levels aligned")
            if in_channels % g or o % g:
                raise ValueError(f"PyConv level {i}: {in_channels} input and {o} output channels must "
                                 f"both be divisible by groups={g}")
            levels.append(factory.conv(dim, in_channels, o, k, stride=stride, dilation=dilation, groups=g))
        self.levels = nn.ModuleList(levels)
        self.dim = dim

    @classmethod
    def from_levels(cls, in_channels: int, out_channels: int, levels: LevelSet, **kwargs) -> "PyConv":
        """Build from a :class:`LevelSet` (a stage preset), splitting ``out_channels`` by its parts."""
        return cls(in_channels, out_channels, levels.kernels, levels.groups,
                   split=levels.split(out_channels), **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.levels) == 1:
            return self.levels[0](x)
        return torch.cat([level(x) for level in self.levels], dim=1)

    def extra_repr(self) -> str:
        desc = ", ".join(f"{tuple(c.kernel_size)}/G{c.groups}->{c.out_channels}" for c in self.levels)
        return f"dim={self.dim}, levels=[{desc}]"
