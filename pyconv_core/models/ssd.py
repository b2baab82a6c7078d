"""SSD300 with a (PyConv)ResNet backbone and PyConvSSD (Duta et al. 2020, S-Section 1, S-Table 1).

The backbone is the foundation's ResNet builder with stage 3 at stride 1, cut after stage 3
(1024 maps at 38x38 for a 300x300 input). Five extra blocks (1x1 reduction, then a spatial
conv) bring the maps to 19, 10, 5, 3 and 1; a 3x3 classifier and a 3x3 box regressor on each
of the six maps predict {4, 6, 6, 6, 4, 4} default boxes per location: 8732 boxes.
The baseline SSD's spatial convs are plain 3x3 (the layout of NVIDIA's SSD300 ResNet-50);
PyConvSSD's are PyConv4, PyConv3, PyConv2 with stride 2, then two unpadded 3x3.

The box machinery of SSD (Liu et al. 2016) lives here too: default boxes, encoding with
variances, matching, the MultiBox loss with hard negative mining, and NMS post-processing.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, box_convert, box_iou

from pyconv_core.layers import factory
from pyconv_core.layers.pyconv import PYCONV_PRESETS, LevelSet, PyConv
from pyconv_core.models.official import load_backbone_weights
from pyconv_core.models.resnet import FAMILIES, STAGES, ResNet
from pyconv_core.registry import register_model

__all__ = [
    "SSD",
    "ExtraBlock",
    "HEADS",
    "HEAD_PRESETS",
    "HEAD_WIDTHS",
    "head_blocks",
    "BoxGeometry",
    "SSD300",
    "geometry_for",
    "map_sizes",
    "default_boxes",
    "encode",
    "decode",
    "match",
    "multibox_loss",
    "postprocess",
    "load_backbone_checkpoint",
]


@dataclass(frozen=True)
class ExtraBlock:
    """One extra block of the head: 1x1 conv (in -> ``mid``), then a spatial conv (``mid`` -> ``out``).

    ``levels`` is the spatial conv's pyramid (one 3x3 level for the baseline). ``padded=False``
    is a single-level 3x3 at stride 1 without padding (5x5 -> 3x3 -> 1x1).
    """

    mid: int
    out: int
    levels: LevelSet
    stride: int = 2
    padded: bool = True


_3X3 = PYCONV_PRESETS["pyconv1"]
# (mid, out) of the five extra blocks: NVIDIA's SSD300 ResNet-50 layout (mid 256, 256, 128, 128, 128;
# out 512, 512, 256, 256, 256). S-Table 1 does not print the widths; with these, all four models'
# params are the paper's to 0.02% at its 81 classes, and their GFLOPs to 0.2% with a 91-output
# classifier (COCO's category ids 0..90, as NVIDIA's and torchvision's SSD heads have): the setup in which
# the paper's GFLOPs were most likely counted (paper.py records it; docs/paper.md s.4).
HEAD_WIDTHS = ((256, 512), (256, 512), (128, 256), (128, 256), (128, 256))


def head_blocks(presets: Sequence[str], widths: Sequence[tuple[int, int]] = HEAD_WIDTHS) -> tuple[ExtraBlock, ...]:
    """Stride-2 blocks with the given spatial pyramids, then unpadded 3x3 blocks for the remaining widths."""
    strided = [ExtraBlock(m, o, PYCONV_PRESETS[p]) for (m, o), p in zip(widths, presets)]
    valid = [ExtraBlock(m, o, _3X3, stride=1, padded=False) for m, o in widths[len(presets) :]]
    return tuple(strided + valid)


# S-Section 1: the PyConvSSD pyramids shrink with resolution (kernels 3..9, 3..7, 3..5).
HEAD_PRESETS: dict[str, tuple[str, ...]] = {
    "ssd": ("pyconv1", "pyconv1", "pyconv1"),
    "pyconvssd": ("pyconv4", "pyconv3", "pyconv2"),
}
HEADS: dict[str, tuple[ExtraBlock, ...]] = {name: head_blocks(p) for name, p in HEAD_PRESETS.items()}


@dataclass(frozen=True)
class BoxGeometry:
    """Default boxes of SSD (Liu et al. 2016, s.2.2) in NVIDIA's SSD300 parametrization (pixels).

    Map k has ``feature_sizes[k]`` cells whose centres are spaced ``steps[k]`` px; its boxes have
    side ``scales[k]``, ``sqrt(scales[k] * scales[k+1])`` and, per aspect ratio a, ``scales[k]``
    times ``(sqrt(a), 1/sqrt(a))`` and its transpose. Offsets are divided by the variances.
    """

    image_size: int
    feature_sizes: tuple[int, ...]
    steps: tuple[float, ...]
    scales: tuple[float, ...]
    aspect_ratios: tuple[tuple[int, ...], ...]
    variances: tuple[float, float] = (0.1, 0.2)

    @property
    def boxes_per_location(self) -> tuple[int, ...]:
        return tuple(2 + 2 * len(a) for a in self.aspect_ratios)

    @property
    def num_boxes(self) -> int:
        return sum(f * f * b for f, b in zip(self.feature_sizes, self.boxes_per_location))


SSD300 = BoxGeometry(
    image_size=300,
    feature_sizes=(38, 19, 10, 5, 3, 1),
    steps=(8, 16, 32, 64, 100, 300),
    scales=(21, 45, 99, 153, 207, 261, 315),
    aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
)


def geometry_for(image_size: int, feature_sizes: Sequence[int]) -> BoxGeometry:
    """SSD300's geometry carried to another input side (the CPU demo's small images).

    A map's boxes keep the size, in cells, that SSD300 gives a map of that many cells (scales
    interpolated log-linearly over SSD300's (map side, scale) pairs), so every object still finds
    well-overlapping default boxes on a coarse grid; aspect ratios follow SSD300's per map index.
    """
    feature_sizes = tuple(feature_sizes)
    if image_size == SSD300.image_size and feature_sizes == SSD300.feature_sizes:
        return SSD300
    sides = np.log([0.5, *SSD300.feature_sizes[::-1]])  # 0.5: the next, never built, map after 1x1
    scales = [s / SSD300.image_size for s in SSD300.scales[::-1]]
    relative = np.interp(np.log([*feature_sizes, feature_sizes[-1] / 2]), sides, scales)
    return BoxGeometry(
        image_size,
        feature_sizes,
        steps=tuple(image_size / f for f in feature_sizes),
        scales=tuple(float(r) * image_size for r in relative),
        aspect_ratios=SSD300.aspect_ratios[: len(feature_sizes)],
        variances=SSD300.variances,
    )


def default_boxes(geometry: BoxGeometry = SSD300) -> torch.Tensor:
    """Default boxes ``[P, 4]`` as (cx, cy, w, h) in [0, 1], ordered map, row, column, box."""
    boxes = []
    for k, (size, step) in enumerate(zip(geometry.feature_sizes, geometry.steps)):
        cells = geometry.image_size / step
        s1, s2 = geometry.scales[k] / geometry.image_size, geometry.scales[k + 1] / geometry.image_size
        shapes = [(s1, s1), (math.sqrt(s1 * s2),) * 2]
        for a in geometry.aspect_ratios[k]:
            shapes += [(s1 * math.sqrt(a), s1 / math.sqrt(a)), (s1 / math.sqrt(a), s1 * math.sqrt(a))]
        for i, j in itertools.product(range(size), repeat=2):
            boxes += [((j + 0.5) / cells, (i + 0.5) / cells, w, h) for w, h in shapes]
    return torch.tensor(boxes, dtype=torch.float32).clamp_(0, 1)


def encode(
    boxes: torch.Tensor, priors: torch.Tensor, variances: tuple[float, float] = SSD300.variances
) -> torch.Tensor:
    """Offsets of xyxy ``boxes`` from cxcywh ``priors`` (both ``[..., 4]``): the regression targets."""
    b = box_convert(boxes, "xyxy", "cxcywh")
    xy = (b[..., :2] - priors[..., :2]) / (variances[0] * priors[..., 2:])
    wh = torch.log(b[..., 2:] / priors[..., 2:]) / variances[1]
    return torch.cat([xy, wh], dim=-1)


def decode(
    offsets: torch.Tensor, priors: torch.Tensor, variances: tuple[float, float] = SSD300.variances
) -> torch.Tensor:
    """Inverse of :func:`encode`: xyxy boxes from predicted offsets."""
    xy = priors[..., :2] + offsets[..., :2] * variances[0] * priors[..., 2:]
    wh = priors[..., 2:] * torch.exp(offsets[..., 2:] * variances[1])
    return box_convert(torch.cat([xy, wh], dim=-1), "cxcywh", "xyxy")


def match(
    gt_boxes: torch.Tensor, gt_labels: torch.Tensor, priors: torch.Tensor, iou_threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign ground truth to default boxes: each prior takes its best box if IoU > ``iou_threshold``,
    and every ground-truth box takes its best prior whatever the IoU (so none goes unmatched).

    Args:
        gt_boxes: ``[G, 4]`` xyxy in [0, 1]; gt_labels: ``[G]`` in 1..C-1 (0 is background).
        priors: ``[P, 4]`` cxcywh.
    Returns:
        matched boxes ``[P, 4]`` xyxy (the prior itself where unmatched) and labels ``[P]`` (0: background).
    """
    prior_xyxy = box_convert(priors, "cxcywh", "xyxy")
    if gt_boxes.numel() == 0:
        return prior_xyxy, torch.zeros(len(priors), dtype=torch.long, device=priors.device)
    ious = box_iou(gt_boxes, prior_xyxy)
    best_iou, best_gt = ious.max(dim=0)
    best_prior = ious.argmax(dim=1)
    best_iou[best_prior] = 2.0
    best_gt[best_prior] = torch.arange(len(gt_boxes), device=priors.device)
    positive = best_iou > iou_threshold
    labels = torch.where(positive, gt_labels[best_gt], torch.zeros_like(best_gt))
    boxes = torch.where(positive[:, None], gt_boxes[best_gt], prior_xyxy)
    return boxes, labels


def multibox_loss(
    loc: torch.Tensor,
    logits: torch.Tensor,
    target_boxes: torch.Tensor,
    target_labels: torch.Tensor,
    priors: torch.Tensor,
    neg_ratio: int = 3,
) -> dict[str, torch.Tensor]:
    """SSD's MultiBox loss: smooth L1 on positives plus cross entropy on positives and the
    ``neg_ratio`` x as many hardest negatives, per image divided by its positives, averaged over
    the batch (images without positives add 0).

    Args:
        loc: ``[N, P, 4]`` predicted offsets; logits: ``[N, P, C]``.
        target_boxes: ``[N, P, 4]`` xyxy from :func:`match`; target_labels: ``[N, P]``.
    """
    positive = target_labels > 0
    num_pos = positive.sum(dim=1)
    loc_loss = F.smooth_l1_loss(loc.float(), encode(target_boxes, priors), reduction="none").sum(-1)
    loc_loss = (loc_loss * positive).sum(dim=1)
    ce = F.cross_entropy(logits.float().transpose(1, 2), target_labels, reduction="none")
    negative_ce = ce.detach().masked_fill(positive, 0.0)
    rank = negative_ce.argsort(dim=1, descending=True).argsort(dim=1)
    hard_negative = rank < (neg_ratio * num_pos).clamp(max=positive.shape[1])[:, None]
    cls_loss = (ce * (positive | hard_negative)).sum(dim=1)
    scale = (num_pos > 0) / num_pos.clamp(min=1)
    loc_loss, cls_loss = (loc_loss * scale).mean(), (cls_loss * scale).mean()
    return {"loss": loc_loss + cls_loss, "loc": loc_loss.detach(), "cls": cls_loss.detach()}


@torch.no_grad()
def postprocess(
    loc: torch.Tensor,
    logits: torch.Tensor,
    priors: torch.Tensor,
    score_threshold: float = 0.05,
    nms_iou: float = 0.5,
    top_k: int = 200,
    pre_nms_top_k: int = 5000,
) -> list[dict[str, torch.Tensor]]:
    """Detections per image: softmax scores, boxes decoded and clipped to [0, 1], class scores above
    ``score_threshold`` (at most ``pre_nms_top_k``), per-class NMS at ``nms_iou``, the ``top_k`` best.

    Returns one dict per image: ``boxes`` ``[K, 4]`` xyxy in [0, 1], ``scores`` ``[K]``,
    ``labels`` ``[K]`` in 1..C-1.
    """
    boxes = decode(loc.float(), priors).clamp(0, 1)
    scores = logits.float().softmax(dim=-1)[..., 1:]
    results = []
    for image_boxes, image_scores in zip(boxes, scores):
        flat = image_scores.flatten()
        keep = (flat > score_threshold).nonzero().squeeze(1)
        keep = keep[flat[keep].topk(min(pre_nms_top_k, len(keep))).indices]
        prior_idx, label = keep // image_scores.shape[1], keep % image_scores.shape[1] + 1
        kept_boxes, kept_scores = image_boxes[prior_idx], flat[keep]
        best = batched_nms(kept_boxes, kept_scores, label, nms_iou)[:top_k]
        results.append({"boxes": kept_boxes[best], "scores": kept_scores[best], "labels": label[best]})
    return results


def _backbone(family: str, depth: int) -> ResNet:
    """The ResNet builder's network with stage 3 at stride 1, cut after stage 3 (docs/paper.md s.4)."""
    strides = list(FAMILIES[family].stage_strides)
    strides[2] = 1
    return ResNet(family, depth, num_classes=0, stage_strides=strides).truncate(after="layer3")


def _extra(in_channels: int, spec: ExtraBlock) -> nn.Sequential:
    if spec.padded:
        spatial: nn.Module = PyConv.from_levels(spec.mid, spec.out, spec.levels, stride=spec.stride)
    elif len(spec.levels.kernels) == 1:
        spatial = factory.conv(2, spec.mid, spec.out, spec.levels.kernels[0], stride=spec.stride, padding=0)
    else:
        raise ValueError(f"an unpadded extra block must have one level, got {spec.levels}")
    return nn.Sequential(
        factory.conv(2, in_channels, spec.mid),
        factory.norm(2, spec.mid),
        nn.ReLU(inplace=True),
        spatial,
        factory.norm(2, spec.out),
        nn.ReLU(inplace=True),
    )


def map_sizes(image_size: int, head: Sequence[ExtraBlock]) -> tuple[int, ...]:
    """Sides of the detection maps for a square input: the backbone's output stride is 8 (each of
    stem, stage 1 or its pool, and stage 2 halves with ceil), then each extra block in turn; blocks
    that would not shrink the map any more are dropped (small inputs of the demo)."""
    sizes = [-(-image_size // 8)]
    for spec in head:
        kernel = 1 if spec.padded else factory.ntuple(spec.levels.kernels[0], 2)[0]
        size = (sizes[-1] - kernel) // spec.stride + 1
        if not 1 <= size < sizes[-1]:
            break
        sizes.append(size)
    return tuple(sizes)


class SSD(nn.Module):
    """SSD over a truncated (PyConv)ResNet; ``forward`` gives raw offsets and class logits.

    Args:
        family: backbone family in ``resnet.FAMILIES`` ("resnet", "pyconvresnet", ...).
        depth: backbone depth (50 or 101 in the paper).
        head: the extra blocks (``HEADS["ssd"]`` or ``HEADS["pyconvssd"]``).
        num_classes: classes including background (81 for COCO).
        image_size: input side. 300 is SSD300 (six maps, 8732 boxes); smaller sides drop the maps
            that vanish and keep the boxes' size in cells (see :func:`geometry_for`).
    """

    priors: torch.Tensor  # the default boxes, a buffer registered in __init__

    def __init__(
        self, family: str, depth: int, head: Sequence[ExtraBlock], num_classes: int = 81, image_size: int = 300
    ) -> None:
        super().__init__()
        sizes = map_sizes(image_size, head)
        if len(sizes) < 2:
            raise ValueError(f"image_size={image_size} is too small for SSD: it leaves {len(sizes)} detection map")
        self.family, self.depth, self.num_classes = family, depth, num_classes
        self.geometry = geometry_for(image_size, sizes)
        self.backbone = _backbone(family, depth)
        extras, map_channels = [], [self.backbone.num_features]
        for spec in head[: len(sizes) - 1]:
            extras.append(_extra(map_channels[-1], spec))
            map_channels.append(spec.out)
        self.extras = nn.ModuleList(extras)
        per_loc = self.geometry.boxes_per_location
        self.loc = nn.ModuleList(nn.Conv2d(c, n * 4, 3, padding=1) for c, n in zip(map_channels, per_loc))
        self.conf = nn.ModuleList(nn.Conv2d(c, n * num_classes, 3, padding=1) for c, n in zip(map_channels, per_loc))
        self.register_buffer("priors", default_boxes(self.geometry), persistent=False)
        for module in [*self.extras, *self.loc, *self.conf]:
            bias = getattr(module, "bias", None)  # the classifiers' and regressors' (extras have none)
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
                elif p is bias:
                    nn.init.zeros_(bias)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The six maps the detectors look at (38, 19, 10, 5, 3, 1 for 300x300)."""
        maps = [self.backbone(x)]
        for block in self.extras:
            maps.append(block(maps[-1]))
        return maps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Offsets ``[N, P, 4]`` and class logits ``[N, P, C]`` for the P default boxes."""
        maps = self.feature_maps(x)
        sizes = tuple(m.shape[-1] for m in maps)
        if sizes != self.geometry.feature_sizes:
            raise ValueError(
                f"input {tuple(x.shape[-2:])} gives maps {sizes}, but the default boxes are laid out "
                f"for {self.geometry.feature_sizes}: resize images to "
                f"{self.geometry.image_size}x{self.geometry.image_size}"
            )
        n = x.shape[0]
        loc = torch.cat([h(m).permute(0, 2, 3, 1).reshape(n, -1, 4) for h, m in zip(self.loc, maps)], dim=1)
        conf = torch.cat(
            [h(m).permute(0, 2, 3, 1).reshape(n, -1, self.num_classes) for h, m in zip(self.conf, maps)], dim=1
        )
        return loc, conf


def load_backbone_checkpoint(model: SSD, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> SSD:
    """Load an ImageNet checkpoint of the same family and depth into ``model.backbone``
    (:func:`load_backbone_weights`: the authors', torchvision's or this workbook's layout). The stages
    that the truncated backbone lacks (stage 4) and the classifier are dropped. Documented filter: in
    families whose shortcut is MaxPool -> 1x1 -> BN, stage 3 at stride 1 has no MaxPool, so its
    ``layer3.0.downsample.{1,2}`` become ``downsample.{0,1}``.
    """
    rename = {}
    if FAMILIES[model.family].pool_shortcut:
        rename = {
            "layer3.0.downsample.1.": "layer3.0.downsample.0.",
            "layer3.0.downsample.2.": "layer3.0.downsample.1.",
        }
    name = getattr(model, "model_args", {}).get("name", type(model).__name__)
    dropped = tuple(f"{stage}." for stage in STAGES if stage not in model.backbone.stage_names) + ("fc.",)
    load_backbone_weights(
        model.backbone,
        source,
        drop=dropped,
        rename=rename,
        label=f"{name} backbone ({model.family}{model.depth} up to stage 3)",
    )
    return model


_DETECTION: dict[str, Any] = dict(task="detection", input_shape=(3, 300, 300))


@register_model(**_DETECTION)
def ssd50(num_classes: int = 81, image_size: int = 300) -> SSD:
    """Baseline SSD300 with a ResNet-50 backbone (S-Table 1: AP 26.20 on COCO val2017)."""
    return SSD("resnet", 50, HEADS["ssd"], num_classes, image_size)


@register_model(**_DETECTION)
def ssd101(num_classes: int = 81, image_size: int = 300) -> SSD:
    """Baseline SSD300 with a ResNet-101 backbone (S-Table 1: AP 29.58)."""
    return SSD("resnet", 101, HEADS["ssd"], num_classes, image_size)


@register_model(**_DETECTION)
def pyconvssd50(num_classes: int = 81, image_size: int = 300) -> SSD:
    """PyConvSSD300 with a PyConvResNet-50 backbone (S-Table 1: AP 29.16)."""
    return SSD("pyconvresnet", 50, HEADS["pyconvssd"], num_classes, image_size)


@register_model(**_DETECTION)
def pyconvssd101(num_classes: int = 81, image_size: int = 300) -> SSD:
    """PyConvSSD300 with a PyConvResNet-101 backbone (S-Table 1: AP 31.27)."""
    return SSD("pyconvresnet", 101, HEADS["pyconvssd"], num_classes, image_size)


@register_model(**_DETECTION)
def ssd18(num_classes: int = 81, image_size: int = 300) -> SSD:
    """SSD300 with a ResNet-18 backbone (256 maps at 38x38; as NVIDIA's resnet18 option): the CPU demo size."""
    return SSD("resnet", 18, HEADS["ssd"], num_classes, image_size)


@register_model(**_DETECTION)
def pyconvssd18(num_classes: int = 81, image_size: int = 300) -> SSD:
    """PyConvSSD300 with a PyConvResNet-18 backbone: the CPU demo size (not in the paper)."""
    return SSD("pyconvresnet", 18, HEADS["pyconvssd"], num_classes, image_size)
