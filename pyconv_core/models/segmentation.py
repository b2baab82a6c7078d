"""Semantic segmentation on a dilated (PyConv)ResNet: PyConvSegNet and its peers (S-Section 6, S-Table 6).

One network, :class:`SegmentationNet`: backbone (output stride 8 or 16) -> head on the stage-4
maps -> Dropout2d + 1x1 classifier, upsampled to the input (bilinear, ``align_corners=True``),
plus the auxiliary head on the stage-3 maps used for deep supervision (loss weight 0.4, in
the task). Four heads, with the widths of the authors' code for 2048 input maps and scaled by
the same ratios for lighter backbones:

* :class:`PyConvPH` (PyConvSegNet): local and global PyConv4 blocks, merged by a 3x3 conv;
* :class:`PPM` (PSPNet, Zhao et al. 2017): pyramid pooling with bins 1, 2, 3, 6, then a 3x3 conv;
* :class:`ASPP` (DeepLabv3, Chen et al. 2017): 1x1, three atrous 3x3 (rates 6/12/18 at OS16,
  doubled at OS8) and image pooling, projected by a 1x1 conv;
* :class:`PlainHead` (the baseline of S-Table 6): one 3x3 conv.

The paper counts params and GFLOPs with the auxiliary head, which only runs in training; so
its records in :mod:`pyconv_core.paper` build the counted networks with ``with_aux=True`` (a forward
pass in evaluation mode that runs the auxiliary head too), at output strides 8 and 16.
``load_official_checkpoint`` reads the authors' layout (iduta/pyconvsegnet, on hszhao/semseg):
``layer0`` (stem) ``layer1..4``, ``pyconvhead.*`` / ``ppm.*``, ``cls.*``, ``aux.*``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pyconv_core.layers import factory
from pyconv_core.layers.pyconv import PYCONV_PRESETS, PyConv
from pyconv_core.models.official import load_backbone_weights
from pyconv_core.models.resnet import FAMILIES, ResNet
from pyconv_core.registry import register_model

__all__ = [
    "SegmentationNet",
    "PyConvPH",
    "PPM",
    "ASPP",
    "PlainHead",
    "aux_head",
    "HEADS",
    "MODEL_HEADS",
    "segmentation_net",
]

PAPER_INPUT = 473


def _conv_bn_relu(conv: nn.Module, channels: int) -> list[nn.Module]:
    """A conv followed by BN and ReLU, as every conv of the heads (flat, for the authors' indices)."""
    return [conv, factory.norm(2, channels), nn.ReLU(inplace=True)]


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resampling with ``align_corners=True`` (the authors' choice everywhere)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def _pyconv_block(in_channels: int, channels: int) -> list[nn.Module]:
    """1x1 (in -> c), PyConv4 (kernels 3,5,7,9, groups 1,4,8,16), 1x1 (c -> c); each with BN, ReLU."""
    pyconv4 = PyConv.from_levels(channels, channels, PYCONV_PRESETS["pyconv4"])
    return [
        *_conv_bn_relu(factory.conv(2, in_channels, channels), channels),
        *_conv_bn_relu(pyconv4, channels),
        *_conv_bn_relu(factory.conv(2, channels, channels), channels),
    ]


class PyConvPH(nn.Module):
    """PyConv parsing head of PyConvSegNet (paper Section 4.3, docs/paper.md s.6).

    Local block on the full maps and global block on maps pooled to ``bins`` x ``bins`` (then
    upsampled), each ``in/4`` wide (512 for 2048 maps); their concatenation is merged by a 3x3
    conv to ``in/8`` (256).
    """

    # (our key prefix in SegmentationNet, the authors' prefix)
    OFFICIAL_KEYS = (
        ("head.local_context.", "pyconvhead.local_context.layers."),
        ("head.global_context.", "pyconvhead.global_context.features."),
        ("head.merge.", "pyconvhead.merge_context.features."),
        ("classifier.", "cls."),
    )

    def __init__(self, in_channels: int = 2048, bins: int = 9, output_stride: int = 8) -> None:
        super().__init__()
        width, self.out_channels = in_channels // 4, in_channels // 8
        self.local_context = nn.Sequential(*_pyconv_block(in_channels, width))
        self.global_context = nn.Sequential(nn.AdaptiveAvgPool2d(bins), *_pyconv_block(in_channels, width))
        self.merge = nn.Sequential(*_conv_bn_relu(factory.conv(2, 2 * width, self.out_channels, 3), self.out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        global_context = _resize(self.global_context(x), x.shape[-2:])
        return self.merge(torch.cat([self.local_context(x), global_context], dim=1))


class PPM(nn.Module):
    """PSPNet's pyramid pooling module: per bin, average pool -> 1x1 (in/len(bins)) -> upsample;
    concatenated with the input, then a 3x3 conv to ``in/4`` (512)."""

    OFFICIAL_KEYS = (("head.stages.", "ppm.features."), ("head.bottleneck.", "cls."), ("classifier.1.", "cls.4."))

    def __init__(self, in_channels: int = 2048, bins: Sequence[int] = (1, 2, 3, 6), output_stride: int = 8) -> None:
        super().__init__()
        reduced, self.out_channels = in_channels // len(bins), in_channels // 4
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), *_conv_bn_relu(factory.conv(2, in_channels, reduced), reduced))
            for b in bins
        )
        self.bottleneck = nn.Sequential(
            *_conv_bn_relu(factory.conv(2, in_channels + reduced * len(bins), self.out_channels, 3), self.out_channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [_resize(stage(x), x.shape[-2:]) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class ASPP(nn.Module):
    """DeepLabv3's atrous spatial pyramid pooling, ``in/8`` (256) wide per branch and after the
    1x1 projection. Rates 6, 12, 18 at output stride 16, doubled at 8 (Chen et al. 2017)."""

    OFFICIAL_KEYS = ()

    def __init__(self, in_channels: int = 2048, rates: Sequence[int] | None = None, output_stride: int = 8) -> None:
        super().__init__()
        rates = rates or tuple(r * 16 // output_stride for r in (6, 12, 18))
        width = self.out_channels = in_channels // 8
        self.branches = nn.ModuleList(
            [nn.Sequential(*_conv_bn_relu(factory.conv(2, in_channels, width), width))]
            + [nn.Sequential(*_conv_bn_relu(factory.conv(2, in_channels, width, 3, dilation=r), width)) for r in rates]
        )
        self.image_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(factory.conv(2, in_channels, width), width)
        )
        self.project = nn.Sequential(*_conv_bn_relu(factory.conv(2, width * (len(rates) + 2), width), width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches] + [_resize(self.image_pool(x), x.shape[-2:])]
        return self.project(torch.cat(outs, dim=1))


class PlainHead(nn.Sequential):
    """The baseline head of S-Table 6: one 3x3 conv to ``in/4`` (512), BN, ReLU."""

    OFFICIAL_KEYS = (("head.", "cls."), ("classifier.1.", "cls.4."))

    def __init__(self, in_channels: int = 2048, output_stride: int = 8) -> None:
        self.out_channels = in_channels // 4
        super().__init__(*_conv_bn_relu(factory.conv(2, in_channels, self.out_channels, 3), self.out_channels))


def aux_head(in_channels: int, num_classes: int, dropout: float = 0.1) -> nn.Sequential:
    """PSPNet's auxiliary head on stage 3: 3x3 conv to ``in/4`` (256), BN, ReLU, Dropout2d, 1x1."""
    width = in_channels // 4
    return nn.Sequential(
        *_conv_bn_relu(factory.conv(2, in_channels, width, 3), width),
        nn.Dropout2d(dropout),
        nn.Conv2d(width, num_classes, 1),
    )


# Every head takes (in_channels, output_stride=...); only ASPP's rates depend on the stride.
Head = PyConvPH | PPM | ASPP | PlainHead
HEADS: dict[str, type[Head]] = {"pyconvph": PyConvPH, "ppm": PPM, "aspp": ASPP, "plain": PlainHead}
# The registered model names (``<name>50``, ``deeplabv3_50``) and their heads.
MODEL_HEADS = {"pyconvsegnet": "pyconvph", "pspnet": "ppm", "deeplabv3": "aspp", "fcn": "plain"}


class SegmentationNet(nn.Module):
    """Dilated backbone -> head -> Dropout2d + 1x1 classifier, upsampled to the input size.

    In training (with an aux head) ``forward`` returns ``{"out": logits, "aux": aux_logits}``,
    both at the input size; otherwise the logits ``[N, classes, H, W]``. ``with_aux=True`` makes
    evaluation mode return the dict too (to count the auxiliary head's FLOPs as the paper did).
    """

    def __init__(
        self,
        backbone: ResNet,
        head: Head,
        num_classes: int,
        dropout: float = 0.1,
        aux: bool = True,
        with_aux: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(head.out_channels, num_classes, 1))
        channels = {info["module"]: info["num_chs"] for info in backbone.feature_info}
        self.aux = aux_head(channels["layer3"], num_classes, dropout) if aux else None
        self.num_classes, self.with_aux = num_classes, with_aux
        self.official_prefixes = [
            ("backbone.conv1.", "layer0.0."),
            ("backbone.bn1.", "layer0.1."),
            ("backbone.", ""),
            *type(head).OFFICIAL_KEYS,
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        size = x.shape[-2:]
        maps = self.backbone.features(x, ("layer3", "layer4"))
        logits = _resize(self.classifier(self.head(maps["layer4"])), size)
        if self.aux is None or not (self.training or self.with_aux):
            return logits
        return {"out": logits, "aux": _resize(self.aux(maps["layer3"]), size)}


def segmentation_net(
    head: str,
    depth: int,
    num_classes: int = 150,
    output_stride: int = 8,
    backbone: str = "resnet",
    dropout: float = 0.1,
    aux: bool = True,
    with_aux: bool = False,
    backbone_weights: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
) -> SegmentationNet:
    """A segmentation network: ``head`` (a key of ``HEADS``) on a ``backbone`` family ("resnet",
    "pyconvresnet", ...) of ``depth`` layers, dilated to ``output_stride`` 8 or 16.

    ``backbone_weights``: an ImageNet checkpoint of the backbone (authors', torchvision's or this
    workbook's layout, path or state_dict; the classifier is dropped) loaded before training, as the
    paper's recipe starts from one. ``with_aux``: evaluation mode runs the auxiliary head too (to be
    counted as S-Table 6 counts it).
    """
    if head not in HEADS:
        raise ValueError(f"unknown segmentation head {head!r}; choose one of {sorted(HEADS)}")
    if backbone not in FAMILIES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(FAMILIES)}")
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride must be 8 or 16 for segmentation, got {output_stride}")
    net = ResNet(backbone, depth, num_classes=0, output_stride=output_stride)
    if backbone_weights is not None:
        load_backbone_weights(net, backbone_weights, label=f"{backbone}{depth} (segmentation backbone)")
    head_module = HEADS[head](net.num_features, output_stride=output_stride)
    return SegmentationNet(net, head_module, num_classes, dropout=dropout, aux=aux, with_aux=with_aux)


_SEG: dict[str, Any] = {"task": "segmentation", "input_shape": (3, PAPER_INPUT, PAPER_INPUT)}


@register_model(**_SEG)
def pyconvsegnet18(**kw) -> SegmentationNet:
    """PyConvSegNet on an 18-layer backbone (head widths scaled to its 512 maps): the CPU demo size."""
    return segmentation_net("pyconvph", 18, **kw)


@register_model(**_SEG)
def pyconvsegnet50(**kw) -> SegmentationNet:
    """PyConvSegNet-50 (S-Table 6): 41.54 / 40.43 mIoU on ADE20K at output stride 8 / 16."""
    return segmentation_net("pyconvph", 50, **kw)


@register_model(**_SEG)
def pyconvsegnet101(**kw) -> SegmentationNet:
    """PyConvSegNet-101 (paper Table 5 uses the PyConvResNet-101 backbone: ``backbone="pyconvresnet"``)."""
    return segmentation_net("pyconvph", 101, **kw)


@register_model(**_SEG)
def pyconvsegnet152(**kw) -> SegmentationNet:
    """PyConvSegNet-152 (paper Table 5 uses the PyConvResNet-152 backbone: ``backbone="pyconvresnet"``)."""
    return segmentation_net("pyconvph", 152, **kw)


@register_model(**_SEG)
def pspnet18(**kw) -> SegmentationNet:
    """PSPNet on an 18-layer backbone: the CPU demo size."""
    return segmentation_net("ppm", 18, **kw)


@register_model(**_SEG)
def pspnet50(**kw) -> SegmentationNet:
    """PSPNet-50 (PPM head, S-Table 6): 41.24 / 39.75 mIoU on ADE20K at output stride 8 / 16."""
    return segmentation_net("ppm", 50, **kw)


@register_model(**_SEG)
def pspnet101(**kw) -> SegmentationNet:
    """PSPNet-101 (PPM head)."""
    return segmentation_net("ppm", 101, **kw)


@register_model(**_SEG)
def pspnet152(**kw) -> SegmentationNet:
    """PSPNet-152 (PPM head)."""
    return segmentation_net("ppm", 152, **kw)


@register_model(**_SEG)
def deeplabv3_18(**kw) -> SegmentationNet:
    """DeepLabv3 on an 18-layer backbone: the CPU demo size."""
    return segmentation_net("aspp", 18, **kw)


@register_model(**_SEG)
def deeplabv3_50(**kw) -> SegmentationNet:
    """DeepLabv3-50 (ASPP head, S-Table 6): 40.91 / 40.34 mIoU on ADE20K at output stride 8 / 16."""
    return segmentation_net("aspp", 50, **kw)


@register_model(**_SEG)
def deeplabv3_101(**kw) -> SegmentationNet:
    """DeepLabv3-101 (ASPP head)."""
    return segmentation_net("aspp", 101, **kw)


@register_model(**_SEG)
def deeplabv3_152(**kw) -> SegmentationNet:
    """DeepLabv3-152 (ASPP head)."""
    return segmentation_net("aspp", 152, **kw)


@register_model(**_SEG)
def fcn18(**kw) -> SegmentationNet:
    """The plain 3x3 head on an 18-layer backbone: the CPU demo size."""
    return segmentation_net("plain", 18, **kw)


@register_model(**_SEG)
def fcn50(**kw) -> SegmentationNet:
    """The S-Table 6 baseline (one 3x3 conv head): 37.87 / 36.84 mIoU on ADE20K at output stride 8 / 16."""
    return segmentation_net("plain", 50, **kw)


@register_model(**_SEG)
def fcn101(**kw) -> SegmentationNet:
    """The plain 3x3 head on a 101-layer backbone."""
    return segmentation_net("plain", 101, **kw)


@register_model(**_SEG)
def fcn152(**kw) -> SegmentationNet:
    """The plain 3x3 head on a 152-layer backbone."""
    return segmentation_net("plain", 152, **kw)
