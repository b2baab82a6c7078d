"""The only place that knows 2D from 3D: conv, norm and pooling classes picked by ``dim``.

Everything else in the package passes ``dim`` through and asks this module for layers, so
2D and 3D networks share every block definition.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

IntOrTuple = int | Sequence[int]
ConvNd = nn.Conv2d | nn.Conv3d  # what conv() builds
NormNd = nn.BatchNorm2d | nn.BatchNorm3d  # what norm() builds

_CONV: dict[int, type[nn.Conv2d] | type[nn.Conv3d]] = {2: nn.Conv2d, 3: nn.Conv3d}
_NORM: dict[int, type[nn.BatchNorm2d] | type[nn.BatchNorm3d]] = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAX_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVG_POOL = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


def _check_dim(dim: int) -> None:
    if dim not in _CONV:
        raise ValueError(f"dim must be 2 (images) or 3 (videos), got {dim}")


def ntuple(value: IntOrTuple, dim: int) -> tuple[int, ...]:
    """Expand an int to a ``dim``-tuple; check that a sequence has ``dim`` entries."""
    if isinstance(value, int):
        return (value,) * dim
    value = tuple(int(v) for v in value)
    if len(value) != dim:
        raise ValueError(f"expected an int or {dim} values, got {value}")
    return value


def conv(
    dim: int,
    in_channels: int,
    out_channels: int,
    kernel: IntOrTuple = 1,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding: IntOrTuple | None = None,
    bias: bool = False,
) -> ConvNd:
    """Convolution, bias-free unless asked; padding defaults to ``dilation * (kernel // 2)`` (size-preserving)."""
    _check_dim(dim)
    kernel, dilation = ntuple(kernel, dim), ntuple(dilation, dim)
    if padding is None:
        padding = tuple(d * (k // 2) for k, d in zip(kernel, dilation))
    make: Callable[..., ConvNd] = _CONV[dim]  # torch types sizes per class; here they are dim-tuples
    return make(
        in_channels, out_channels, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias
    )


def norm(dim: int, channels: int) -> NormNd:
    """Batch normalization for ``dim``-D feature maps."""
    _check_dim(dim)
    return _NORM[dim](channels)


def max_pool(dim: int, kernel: IntOrTuple, stride: IntOrTuple, padding: IntOrTuple) -> nn.Module:
    """Max pooling for ``dim``-D feature maps."""
    _check_dim(dim)
    make: Callable[..., nn.Module] = _MAX_POOL[dim]
    return make(kernel, stride=stride, padding=padding)


def global_avg_pool(dim: int) -> nn.Module:
    """Global average pooling to one value per channel."""
    _check_dim(dim)
    return _AVG_POOL[dim](1)


def channels_last(dim: int) -> torch.memory_format:
    """The channels-last memory format of ``dim``-D feature maps: NHWC for images, NDHWC for videos."""
    _check_dim(dim)
    return _CHANNELS_LAST[dim]


def conv_types() -> tuple[type[nn.Conv2d] | type[nn.Conv3d], ...]:
    """All convolution classes the factory builds (for weight init)."""
    return tuple(_CONV.values())


def norm_types() -> tuple[type[nn.BatchNorm2d] | type[nn.BatchNorm3d], ...]:
    """All normalization classes the factory builds (for weight init)."""
    return tuple(_NORM.values())
