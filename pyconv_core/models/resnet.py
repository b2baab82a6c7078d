"""ResNet, PyConvResNet and PyConvHGResNet from one builder (Duta et al. 2020, Table 2; docs/paper.md s.2).

A family is data: per stage, the PyConv levels of its spatial convolution; plus the stem
(with or without max pool) and the shortcut (strided 1x1 conv, or max pool then 1x1 conv).
The baseline ResNet is the same network with single-level 3x3 "pyramids", a max-pool stem
and strided 1x1 shortcuts, which is exactly torchvision's ResNet (same state_dict keys).
``dim=3`` gives the video networks from the same blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pyconv_core.layers import factory
from pyconv_core.layers.factory import IntOrTuple
from pyconv_core.layers.pyconv import PYCONV_PRESETS, LevelSet, PyConv
from pyconv_core.registry import register_model

__all__ = ["ResNet", "Bottleneck", "BasicBlock", "FAMILIES", "DEPTHS", "STAGES"]

PLAIN_3X3 = PYCONV_PRESETS["pyconv1"]
PLAIN_1X1 = LevelSet(kernels=(1,), groups=(1,), parts=(1,))


@dataclass(frozen=True)
class Family:
    """What distinguishes ResNet, PyConvResNet and PyConvHGResNet (docs/paper.md s.2)."""

    stage_levels: tuple[LevelSet, ...]
    widths: tuple[int, ...] = (64, 128, 256, 512)
    bottleneck_expansion: int = 4
    stem_pool: bool = True
    pool_shortcut: bool = False
    basic_second: LevelSet = PLAIN_3X3

    @property
    def stage_strides(self) -> tuple[int, ...]:
        """PyConv networks have no stem max pool, so every stage's first block downsamples."""
        return (1, 2, 2, 2) if self.stem_pool else (2, 2, 2, 2)


FAMILIES: dict[str, Family] = {
    "resnet": Family(stage_levels=(PLAIN_3X3,) * 4),
    "pyconvresnet": Family(
        stage_levels=tuple(PYCONV_PRESETS[p] for p in ("pyconv4", "pyconv3", "pyconv2", "pyconv1")),
        stem_pool=False,
        pool_shortcut=True,
        basic_second=PLAIN_1X1,
    ),
    "pyconvhgresnet": Family(
        stage_levels=(
            LevelSet((3, 5, 7, 9), (32, 32, 32, 32), (1, 1, 1, 1)),
            LevelSet((3, 5, 7), (32, 64, 64), (1, 1, 2)),
            LevelSet((3, 5), (32, 64), (1, 1)),
            LevelSet((3,), (32,), (1,)),
        ),
        widths=(128, 256, 512, 1024),
        bottleneck_expansion=2,
        stem_pool=False,
        pool_shortcut=True,
    ),
}

# The stages' module names, as in torchvision and the authors' checkpoints.
STAGES = ("layer1", "layer2", "layer3", "layer4")

# depth -> (block, blocks per stage)
DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


class Bottleneck(nn.Module):
    """1x1 (in->w), PyConv (w->w, stride), 1x1 (w->e*w), each with BN; residual add; ReLU."""

    def __init__(
        self,
        in_channels: int,
        width: int,
        out_channels: int,
        levels: LevelSet,
        stride: IntOrTuple,
        dilation: IntOrTuple,
        shortcut: nn.Module | None,
        dim: int,
        second: LevelSet | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = factory.conv(dim, in_channels, width)
        self.bn1 = factory.norm(dim, width)
        self.conv2 = PyConv.from_levels(width, width, levels, stride=stride, dilation=dilation, dim=dim)
        self.bn2 = factory.norm(dim, width)
        self.conv3 = factory.conv(dim, width, out_channels)
        self.bn3 = factory.norm(dim, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut

    def last_norm(self) -> factory.NormNd:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class BasicBlock(nn.Module):
    """PyConv (in->w, stride), then ``second`` (3x3 for ResNet, 1x1 for PyConvResNet), residual."""

    def __init__(
        self,
        in_channels: int,
        width: int,
        out_channels: int,
        levels: LevelSet,
        stride: IntOrTuple,
        dilation: IntOrTuple,
        shortcut: nn.Module | None,
        dim: int,
        second: LevelSet | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = PyConv.from_levels(in_channels, width, levels, stride=stride, dilation=dilation, dim=dim)
        self.bn1 = factory.norm(dim, width)
        self.conv2 = PyConv.from_levels(width, out_channels, second or PLAIN_3X3, dilation=dilation, dim=dim)
        self.bn2 = factory.norm(dim, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut

    def last_norm(self) -> factory.NormNd:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


BLOCKS = {"basic": (BasicBlock, 1), "bottleneck": (Bottleneck, None)}


def dilate_stages(strides: Sequence[int], reduction: int, output_stride: int) -> tuple[list[int], list[int]]:
    """Per-stage strides and dilations that stop downsampling at ``output_stride``.

    ``reduction`` is the stem's downsampling. A stage that would pass ``output_stride`` gets
    stride 1 and multiplies the dilation instead, for all its blocks (PSPNet / DeepLab, as in
    the authors' segmentation code): OS8 dilates stage 3 by 2 and stage 4 by 4, OS16 stage 4 by 2.
    """
    new_strides, dilations, dilation = [], [], 1
    for stride in strides:
        if reduction * stride > output_stride:
            stride, dilation = 1, dilation * stride
        reduction *= stride
        new_strides.append(stride)
        dilations.append(dilation)
    return new_strides, dilations


class ResNet(nn.Module):
    """One residual network class for every family, depth and dimensionality.

    Args:
        family: a :class:`Family` (or its name in ``FAMILIES``).
        depth: 18, 34, 50, 101 or 152 (``DEPTHS``).
        num_classes: classifier outputs; 0 keeps the pooled features only.
        zero_init_residual: start each block's last BN at 0 (the block begins as identity).
        dropout: dropout probability before the classifier.
        dim: 2 for images, 3 for videos.
        stem_kernel, stem_stride, stem_pool: the stem conv and its max pool (kernel, stride,
            padding), overriding the family's (3D networks use e.g. (5, 7, 7) and (1, 2, 2)).
        stage_strides, stage_levels: per-stage overrides of the family's tables.
        stage_blocks: blocks per stage, overriding the depth's (e.g. a shallow CPU demo network).
        output_stride: 32, or 16 / 8 for dense prediction (2D): stages that would downsample
            past it trade their stride for dilation (:func:`dilate_stages`; docs/paper.md s.6).

    The backbone contract, for the heads built on it: :meth:`stem`, then the stages named in
    ``stage_names``; :meth:`features` gives the maps of named stages; ``feature_info`` gives each
    stage's module name, channels (``num_chs``) and downsampling per axis from the input
    (``reduction``); :meth:`truncate` drops the stages after one and the classifier.
    """

    layer1: nn.Sequential  # the stages, added by name in __init__
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(
        self,
        family: Family | str,
        depth: int,
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        dropout: float = 0.0,
        dim: int = 2,
        in_channels: int = 3,
        stem_kernel: IntOrTuple = 7,
        stem_stride: IntOrTuple = 2,
        stem_pool: tuple[IntOrTuple, IntOrTuple, IntOrTuple] | None | str = "family",
        stage_strides: Sequence[IntOrTuple] | None = None,
        stage_levels: Sequence[LevelSet] | None = None,
        output_stride: int = 32,
        stage_blocks: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        family = FAMILIES[family] if isinstance(family, str) else family
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth}")
        block_name, blocks = DEPTHS[depth]
        blocks = tuple(stage_blocks) if stage_blocks else blocks
        block, expansion = BLOCKS[block_name]
        expansion = expansion or family.bottleneck_expansion
        if isinstance(stem_pool, str):
            if stem_pool != "family":
                raise ValueError(f"stem_pool must be (kernel, stride, padding), None or 'family', got {stem_pool!r}")
            stem_pool = (3, 2, 1) if family.stem_pool else None
        self.dim, self.family, self.pool_shortcut = dim, family, family.pool_shortcut
        self.truncated = False

        self.conv1 = factory.conv(dim, in_channels, 64, stem_kernel, stride=stem_stride)
        self.bn1 = factory.norm(dim, 64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = factory.max_pool(dim, *stem_pool) if stem_pool else nn.Identity()

        strides = stage_strides or family.stage_strides
        levels = stage_levels or family.stage_levels
        dilations = [1] * len(strides)
        if output_stride != 32:
            if output_stride not in (8, 16) or dim != 2:
                raise ValueError(
                    f"output_stride must be 32, or 8 or 16 for 2D networks; got {output_stride} with dim={dim}"
                )

            def side(size: IntOrTuple) -> int:  # the width axis of a 2D size
                return factory.ntuple(size, dim)[-1]

            stem_reduction = side(stem_stride) * (side(stem_pool[1]) if stem_pool else 1)
            strides, dilations = dilate_stages([side(s) for s in strides], stem_reduction, output_stride)
        channels = 64
        reduction = [
            a * b
            for a, b in zip(factory.ntuple(stem_stride, dim), factory.ntuple(stem_pool[1] if stem_pool else 1, dim))
        ]
        self.feature_info: list[dict[str, Any]] = []
        for name, n, width, stride, dilation, level_set in zip(
            STAGES, blocks, family.widths, strides, dilations, levels
        ):
            out = width * expansion
            reduction = [r * s for r, s in zip(reduction, factory.ntuple(stride, dim))]
            stage = []
            for b in range(n):
                block_stride = stride if b == 0 else 1
                shortcut = self._shortcut(channels, out, block_stride, dilated=b == 0 and dilation > 1)
                stage.append(
                    block(
                        channels,
                        width,
                        out,
                        level_set,
                        block_stride,
                        dilation,
                        shortcut,
                        dim,
                        second=family.basic_second,
                    )
                )
                channels = out
            self.add_module(name, nn.Sequential(*stage))
            self.feature_info.append({"module": name, "num_chs": out, "reduction": tuple(reduction)})
        self.stage_names: tuple[str, ...] = tuple(info["module"] for info in self.feature_info)
        self.num_features = channels
        self.avgpool = factory.global_avg_pool(dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(channels, num_classes) if num_classes else nn.Identity()
        self._init_weights(zero_init_residual)

    def _shortcut(
        self, in_channels: int, out_channels: int, stride: IntOrTuple, dilated: bool = False
    ) -> nn.Module | None:
        """The first block's shortcut; in a dilated stage the MaxPool stays, with stride 1 (authors' code)."""
        strided = factory.ntuple(stride, self.dim) != (1,) * self.dim
        if not strided and not dilated and in_channels == out_channels:
            return None
        if not self.pool_shortcut:
            return nn.Sequential(
                factory.conv(self.dim, in_channels, out_channels, 1, stride=stride),
                factory.norm(self.dim, out_channels),
            )
        pool = factory.max_pool(self.dim, 3, stride, 1)
        if in_channels == out_channels:
            return pool
        project = [factory.conv(self.dim, in_channels, out_channels), factory.norm(self.dim, out_channels)]
        return nn.Sequential(*([pool] if strided or dilated else []), *project)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, factory.conv_types()):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, factory.norm_types()):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (Bottleneck, BasicBlock)):
                    nn.init.zeros_(m.last_norm().weight)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The maps that enter the first stage: conv1, BN, ReLU and the max pool (where the family has one)."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def stages(self) -> list[tuple[str, nn.Sequential]]:
        """The stages this network holds, as (name, module), in order."""
        return [(name, getattr(self, name)) for name in self.stage_names]

    def features(self, x: torch.Tensor, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """The maps of the stages ``names`` (default: every stage), by name; the stages after the
        last one asked for do not run. A head asks for stages by name instead of chaining modules."""
        wanted = self.stage_names if names is None else tuple(names)
        unknown = [name for name in wanted if name not in self.stage_names]
        if unknown or not wanted:
            raise ValueError(f"features() takes stage names among {self.stage_names}, got {list(wanted)}")
        last = max(self.stage_names.index(name) for name in wanted)
        x, maps = self.stem(x), {}
        for name, stage in self.stages()[: last + 1]:
            x = stage(x)
            if name in wanted:
                maps[name] = x
        return maps

    def truncate(self, after: str) -> ResNet:
        """Drop the stages after ``after`` and the classifier, in place, and return the network: its
        ``forward`` then gives ``after``'s maps (a detection backbone). The kept modules keep their
        state_dict keys, so classifier checkpoints still load (without the dropped stages and ``fc``)."""
        if after not in self.stage_names:
            raise ValueError(f"truncate(after=...) takes one of {self.stage_names}, got {after!r}")
        keep = self.stage_names.index(after) + 1
        for name in self.stage_names[keep:]:
            delattr(self, name)
        del self.avgpool, self.dropout, self.fc
        self.stage_names, self.feature_info = self.stage_names[:keep], self.feature_info[:keep]
        self.num_features, self.truncated = self.feature_info[-1]["num_chs"], True
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's maps."""
        return self.features(x, self.stage_names[-1:])[self.stage_names[-1]]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global pooling, dropout and the classifier (pooled features when ``num_classes=0``)."""
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits; after :meth:`truncate`, the last kept stage's maps."""
        features = self.forward_features(x)
        return features if self.truncated else self.forward_head(features)


@register_model()
def resnet18(**kw) -> ResNet:
    """ResNet-18 (He et al. 2016), torchvision's layout."""
    return ResNet("resnet", 18, **kw)


@register_model()
def resnet34(**kw) -> ResNet:
    """ResNet-34 (He et al. 2016), torchvision's layout."""
    return ResNet("resnet", 34, **kw)


@register_model()
def resnet50(**kw) -> ResNet:
    """ResNet-50, the paper's baseline (76.12% top-1)."""
    return ResNet("resnet", 50, **kw)


@register_model()
def resnet101(**kw) -> ResNet:
    """ResNet-101, the paper's baseline (78.00% top-1)."""
    return ResNet("resnet", 101, **kw)


@register_model()
def resnet152(**kw) -> ResNet:
    """ResNet-152, the paper's baseline (78.45% top-1)."""
    return ResNet("resnet", 152, **kw)


@register_model()
def pyconvresnet18(**kw) -> ResNet:
    """PyConvResNet-18: basic blocks of one PyConv and one 1x1 conv (authors' code)."""
    return ResNet("pyconvresnet", 18, **kw)


@register_model()
def pyconvresnet34(**kw) -> ResNet:
    """PyConvResNet-34: basic blocks of one PyConv and one 1x1 conv (authors' code)."""
    return ResNet("pyconvresnet", 34, **kw)


@register_model()
def pyconvresnet50(**kw) -> ResNet:
    """PyConvResNet-50 (paper Table 2): 77.88% top-1, standard recipe."""
    return ResNet("pyconvresnet", 50, **kw)


@register_model()
def pyconvresnet101(**kw) -> ResNet:
    """PyConvResNet-101 (paper Table 2): 79.01% top-1, standard recipe."""
    return ResNet("pyconvresnet", 101, **kw)


@register_model()
def pyconvresnet152(**kw) -> ResNet:
    """PyConvResNet-152 (paper Table 2): 79.52% top-1, standard recipe."""
    return ResNet("pyconvresnet", 152, **kw)


@register_model()
def pyconvhgresnet50(**kw) -> ResNet:
    """PyConvHGResNet-50 (high grouping, paper Table 2): 78.48% top-1."""
    return ResNet("pyconvhgresnet", 50, **kw)


@register_model()
def pyconvhgresnet101(**kw) -> ResNet:
    """PyConvHGResNet-101 (high grouping, paper Table 2): 79.22% top-1."""
    return ResNet("pyconvhgresnet", 101, **kw)


@register_model()
def pyconvhgresnet152(**kw) -> ResNet:
    """PyConvHGResNet-152 (high grouping, paper Table 2): 79.36% top-1."""
    return ResNet("pyconvhgresnet", 152, **kw)
