"""Inception-ResNet-v2 and PyConvInception (S-Section 5, S-Table 5; docs/paper.md s.7).

Inception-ResNet-v2 (Szegedy et al. 2017) as released (TF-slim, timm): stem, Mixed-5b,
10 x Inception-ResNet-A (block35, scale 0.17), Reduction-A, 20 x B (block17, 0.10),
Reduction-B, 10 x C (block8, 0.20; the last one without ReLU), 1x1 conv to 1536, pool, fc.
(The paper's Fig. 15 draws 5 / 10 / 5 blocks; the released network, whose 55,843,464
parameters S-Table 5 quotes as 55.84M, has 10 / 20 / 10.) Each block is data: a tuple of branches, each branch a
chain of units, so Inception-ResNet-v2 and PyConvInception are two tables for one builder.

PyConvInception (the paper's authors did not publish its code; this is our design, tuned so
the counts land on S-Table 5) keeps the stem and the pooling / strided 3x3 branches and
replaces each factorized (1x7 then 7x1, 1x3 then 3x1) or chained (3x3 then 3x3) branch by one
PyConv whose largest kernel equals the receptive field of the chain it replaces. The residual
blocks become PyConv bottlenecks, ``1x1 (in -> w), PyConv (w -> w), 1x1 up (w -> in)`` with
the same residual scaling; their separate 1x1 branch is dropped. Levels (kernel / groups ->
output channels), at 299x299 input:

| block (repeats, maps) | Inception-ResNet-v2 branches replaced | PyConvInception branch |
|---|---|---|
| Mixed-5b (1, 38x38) | 1x1 64 -> 3x3 96 -> 3x3 96 | 1x1 64 -> PyConv2 3/G1->48, 5/G4->48 |
| A (10, 38x38) | 1x1 32; 1x1 32 -> 3x3 32; 1x1 32 -> 3x3 48 -> 3x3 64 | 1x1 96 -> PyConv2 3/G1->48, 5/G4->48 |
| Reduction-A (1, 38->19) | 1x1 256 -> 3x3 256 -> 3x3/2 384 | 1x1 256 -> PyConv2 stride 2: 3/G1->192, 5/G4->192 |
| B (20, 19x19) | 1x1 192; 1x1 128 -> 1x7 160 -> 7x1 192 | 1x1 192 -> PyConv3 3/G1->48, 5/G4->48, 7/G8->96 |
| Reduction-B (1, 19->10) | 1x1 256 -> 3x3 288 -> 3x3/2 320 | 1x1 256 -> PyConv2 stride 2: 3/G1->160, 5/G4->160 |
| C (10, 10x10) | 1x1 192; 1x1 192 -> 1x3 224 -> 3x1 256 | 1x1 280 -> PyConv1 3/G1->280 |

The bottleneck widths 96 / 192 / 280 are the free choice that sets the counts: 43.56M params
(+0.2% vs 43.48M) and 12.03 GFLOPs (+0.9% vs 11.92) at 299.

Spatial sizes: the paper's count for Inception-ResNet-v2 (16.75 GFLOPs at 299) is that of the
network with size-preserving padding everywhere (TF-slim's ``align_feature_maps=True``: 299 ->
150 -> 75 -> 38 -> 19 -> 10; we measure 16.54 GMACs, 16.63 GFLOPs with element-wise work),
which PyConv's ``k // 2`` padding implies as well. ``align_feature_maps=False`` gives the
released 'VALID' stem and reductions (35 -> 17 -> 8; 13.16 GMACs, 13.23 GFLOPs); a strided
PyConv cannot follow that, so PyConvInception needs aligned maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pyconv_core.layers import factory
from pyconv_core.layers.factory import IntOrTuple
from pyconv_core.layers.pyconv import PYCONV_PRESETS, LevelSet, PyConv
from pyconv_core.registry import register_model

__all__ = ["Inception", "InceptionDesign", "Conv", "Pyramid", "Pool", "DESIGNS"]


@dataclass(frozen=True)
class Conv:
    """Conv, BN, ReLU. ``valid``: no padding, unless the network aligns its feature maps."""

    out: int
    kernel: IntOrTuple = 1
    stride: int = 1
    valid: bool = False


@dataclass(frozen=True)
class Pyramid:
    """PyConv, BN, ReLU (padding ``k // 2`` per level, so always size-preserving)."""

    out: int
    levels: LevelSet
    stride: int = 1


@dataclass(frozen=True)
class Pool:
    """3x3 max pool (``valid`` like :class:`Conv`), or a 3x3/1 average pool ignoring the padding."""

    stride: int = 2
    average: bool = False
    valid: bool = True


Unit = Conv | Pyramid | Pool
Branch = tuple[Unit, ...]
Block = tuple[Branch, ...]


@dataclass(frozen=True)
class InceptionDesign:
    """The tables of one Inception-ResNet network: stem chain, then blocks given as branches."""

    stem: Branch
    mixed_5b: Block
    block_a: Block
    reduction_a: Block
    block_b: Block
    reduction_b: Block
    block_c: Block
    repeats: tuple[int, int, int] = (10, 20, 10)
    scales: tuple[float, float, float] = (0.17, 0.10, 0.20)
    features: int = 1536


_IRV2_STEM: Branch = (
    Conv(32, 3, 2, valid=True),
    Conv(32, 3, valid=True),
    Conv(64, 3),
    Pool(),
    Conv(80, 1),
    Conv(192, 3, valid=True),
    Pool(),
)
_IRV2_MIXED_5B: Block = (
    (Conv(96),),
    (Conv(48), Conv(64, 5)),
    (Conv(64), Conv(96, 3), Conv(96, 3)),
    (Pool(stride=1, average=True, valid=False), Conv(64)),
)
_PYCONV2 = PYCONV_PRESETS["pyconv2"]
_PYCONV3 = PYCONV_PRESETS["pyconv3"]
_PYCONV1 = PYCONV_PRESETS["pyconv1"]

DESIGNS: dict[str, InceptionDesign] = {
    "inception_resnet_v2": InceptionDesign(
        stem=_IRV2_STEM,
        mixed_5b=_IRV2_MIXED_5B,
        block_a=((Conv(32),), (Conv(32), Conv(32, 3)), (Conv(32), Conv(48, 3), Conv(64, 3))),
        reduction_a=((Conv(384, 3, 2, valid=True),), (Conv(256), Conv(256, 3), Conv(384, 3, 2, valid=True)), (Pool(),)),
        block_b=((Conv(192),), (Conv(128), Conv(160, (1, 7)), Conv(192, (7, 1)))),
        reduction_b=(
            (Conv(256), Conv(384, 3, 2, valid=True)),
            (Conv(256), Conv(288, 3, 2, valid=True)),
            (Conv(256), Conv(288, 3), Conv(320, 3, 2, valid=True)),
            (Pool(),),
        ),
        block_c=((Conv(192),), (Conv(192), Conv(224, (1, 3)), Conv(256, (3, 1)))),
    ),
    "pyconvinception": InceptionDesign(
        stem=_IRV2_STEM,
        mixed_5b=_IRV2_MIXED_5B[:2] + ((Conv(64), Pyramid(96, _PYCONV2)),) + _IRV2_MIXED_5B[3:],
        block_a=((Conv(96), Pyramid(96, _PYCONV2)),),
        reduction_a=((Conv(384, 3, 2, valid=True),), (Conv(256), Pyramid(384, _PYCONV2, 2)), (Pool(),)),
        block_b=((Conv(192), Pyramid(192, _PYCONV3)),),
        reduction_b=(
            (Conv(256), Conv(384, 3, 2, valid=True)),
            (Conv(256), Conv(288, 3, 2, valid=True)),
            (Conv(256), Pyramid(320, _PYCONV2, 2)),
            (Pool(),),
        ),
        block_c=((Conv(280), Pyramid(280, _PYCONV1)),),
    ),
}


def _unit(in_channels: int, unit: Unit, aligned: bool) -> tuple[nn.Module, int]:
    """The module of one unit and its output channels."""
    if isinstance(unit, Pool):
        pad = 0 if unit.valid and not aligned else 1
        if unit.average:
            return nn.AvgPool2d(3, unit.stride, pad, count_include_pad=False), in_channels
        return factory.max_pool(2, 3, unit.stride, pad), in_channels
    if isinstance(unit, Pyramid):
        if unit.stride != 1 and not aligned:
            raise ValueError(
                "a strided PyConv pads k // 2 per level and cannot match the 'VALID' reductions: "
                "build PyConvInception with align_feature_maps=True"
            )
        conv: nn.Module = PyConv.from_levels(in_channels, unit.out, unit.levels, stride=unit.stride)
    else:
        padding = 0 if unit.valid and not aligned else None
        conv = factory.conv(2, in_channels, unit.out, unit.kernel, stride=unit.stride, padding=padding)
    return nn.Sequential(conv, factory.norm(2, unit.out), nn.ReLU(inplace=True)), unit.out


def _chain(in_channels: int, branch: Branch, aligned: bool) -> tuple[nn.Sequential, int]:
    """A branch's units in sequence, and its output channels."""
    modules = []
    for unit in branch:
        module, in_channels = _unit(in_channels, unit, aligned)
        modules.append(module)
    return nn.Sequential(*modules), in_channels


class Mixed(nn.Module):
    """Parallel branches over the same input, concatenated along channels (an inception block)."""

    def __init__(self, in_channels: int, block: Block, aligned: bool) -> None:
        super().__init__()
        chains = [_chain(in_channels, branch, aligned) for branch in block]
        self.branches = nn.ModuleList(chain for chain, _ in chains)
        self.out_channels = sum(out for _, out in chains)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


class ScaledResidual(nn.Module):
    """``relu(x + scale * up(mixed(x)))``: an Inception-ResNet block (Szegedy et al. 2017, s.3.3).

    ``up`` is a 1x1 conv with bias and no BN back to the input width; scaling the residual
    (0.1-0.3) keeps the training of these wide residual stacks stable.
    """

    def __init__(self, channels: int, block: Block, scale: float, aligned: bool, activate: bool = True) -> None:
        super().__init__()
        self.mixed = Mixed(channels, block, aligned)
        self.up = factory.conv(2, self.mixed.out_channels, channels, bias=True)
        self.scale = scale
        self.relu = nn.ReLU(inplace=True) if activate else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.scale * self.up(self.mixed(x)))


def _residual_stack(
    channels: int, block: Block, repeats: int, scale: float, aligned: bool, last_relu: bool = True
) -> nn.Sequential:
    """``repeats`` scaled residual blocks; the network's very last one has no ReLU (TF-slim's block8)."""
    return nn.Sequential(
        *(
            ScaledResidual(channels, block, scale, aligned, activate=last_relu or i < repeats - 1)
            for i in range(repeats)
        )
    )


class Inception(nn.Module):
    """Inception-ResNet-v2 or PyConvInception, from an :class:`InceptionDesign`.

    Args:
        design: an :class:`InceptionDesign` or its name in ``DESIGNS``.
        num_classes: classifier outputs; 0 keeps the pooled features only.
        dropout: dropout probability before the classifier (TF-slim trains with 0.2).
        align_feature_maps: size-preserving padding in the stem and reductions (see module doc).
        in_channels: channels of the input images.
    """

    def __init__(
        self,
        design: InceptionDesign | str,
        num_classes: int = 1000,
        dropout: float = 0.0,
        align_feature_maps: bool = True,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        design = DESIGNS[design] if isinstance(design, str) else design
        aligned = align_feature_maps
        self.stem, channels = _chain(in_channels, design.stem, aligned)
        self.mixed_5b = Mixed(channels, design.mixed_5b, aligned)
        channels = self.mixed_5b.out_channels
        (n_a, n_b, n_c), (scale_a, scale_b, scale_c) = design.repeats, design.scales
        self.blocks_a = _residual_stack(channels, design.block_a, n_a, scale_a, aligned)
        self.reduction_a = Mixed(channels, design.reduction_a, aligned)
        self.feature_info = [{"module": "blocks_a", "num_chs": channels}]
        channels = self.reduction_a.out_channels
        self.blocks_b = _residual_stack(channels, design.block_b, n_b, scale_b, aligned)
        self.reduction_b = Mixed(channels, design.reduction_b, aligned)
        self.feature_info.append({"module": "blocks_b", "num_chs": channels})
        channels = self.reduction_b.out_channels
        self.blocks_c = _residual_stack(channels, design.block_c, n_c, scale_c, aligned, last_relu=False)
        self.head_conv, channels = _unit(channels, Conv(design.features), aligned)
        self.feature_info.append({"module": "head_conv", "num_chs": channels})
        self.num_features = channels
        self.avgpool = factory.global_avg_pool(2)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(channels, num_classes) if num_classes else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, factory.conv_types()):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, factory.norm_types()):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mixed_5b(self.stem(x))
        x = self.reduction_a(self.blocks_a(x))
        x = self.reduction_b(self.blocks_b(x))
        return self.head_conv(self.blocks_c(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(input_shape=(3, 299, 299))
def inception_resnet_v2(**kw) -> Inception:
    """Inception-ResNet-v2 (Szegedy et al. 2017), S-Table 5's baseline: 20.49% top-1 error."""
    return Inception("inception_resnet_v2", **kw)


@register_model(input_shape=(3, 299, 299))
def pyconvinception(**kw) -> Inception:
    """PyConvInception (S-Table 5): PyConv blocks in Inception-ResNet-v2, 20.31% top-1 error."""
    return Inception("pyconvinception", **kw)
