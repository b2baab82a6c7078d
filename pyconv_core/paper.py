"""The paper's figures per registered model, with the setup they were counted in (docs/paper.md).

``PAPER["pyconvresnet50"]`` is one :class:`PaperFigures`: params, GFLOPs per counted setup, the
table's metrics, and what the paper counted (sample shape, classes, builder arguments, source).
:func:`pyconv_core.profile.profile_rows` counts each model in these setups; tests and notebooks
compare against this table only. Like the registry, this module imports no model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = ["Setup", "PaperFigures", "PAPER", "COCO_METRICS"]

# COCOeval's 12 summary numbers, in the order of S-Table 1's columns.
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class Setup(NamedTuple):
    """One setup the paper counted a model in: the input side (H = W; clips keep their frames)
    and, for segmentation, the backbone's output stride."""

    side: int
    output_stride: int | None = None


@dataclass(frozen=True)
class PaperFigures:
    """What the paper (or the authors' code) reports for one registered model, and how it counted.

    ``input_shape`` is one sample, ``(C, H, W)`` or ``(C, T, H, W)``, at the model's first setup;
    ``num_classes`` and ``model_args`` are the builder arguments of the counted network (segmentation:
    ``with_aux``, since S-Table 6 counts the auxiliary head). ``gflops`` and ``metrics`` are keyed by
    :class:`Setup`; ``params`` is exact (authors' code) or as printed. ``gflops_num_classes``: the classifier
    outputs the GFLOPs were counted with where they differ from ``num_classes`` (SSD: 91, COCO's ids 0..90).
    """

    source: str
    input_shape: tuple[int, ...]
    num_classes: int
    params: float | None = None
    gflops: Mapping[Setup, float] = field(default_factory=dict)
    metrics: Mapping[Setup, Mapping[str, float]] = field(default_factory=dict)
    model_args: Mapping[str, Any] = field(default_factory=dict)
    gflops_num_classes: int | None = None

    def setups(self) -> list[Setup]:
        """The setups with figures (GFLOPs first), or the input shape's own when there are none."""
        keys = dict.fromkeys([*self.gflops, *self.metrics])
        return list(keys) or [Setup(self.input_shape[-1])]

    def metrics_at(self, output_stride: int | None = None) -> Mapping[str, float]:
        """The table's metrics at the input shape's side (and ``output_stride``); empty if none."""
        return self.metrics.get(Setup(self.input_shape[-1], output_stride), {})


_AUTHORS = "authors' code / docs/paper.md#counting"
_TABLE2 = "paper Table 2 / docs/paper.md s.2"
_S_TABLE1 = "S-Table 1 / docs/paper.md s.4"
_S_TABLE3 = "S-Tables 2-3 (Kinetics-400, 16x224x224 clips) / docs/paper.md s.5"
_S_TABLE5 = "S-Table 5 / docs/paper.md s.7"
_S_TABLE6 = "S-Table 6 (ADE20K, ResNet-50, aux head counted) / docs/paper.md s.6"


def _imagenet(params: float | None, source: str, top1: float | None = None, **gflops: float) -> PaperFigures:
    """A 224x224 ImageNet classifier; ``gflops`` as ``s224=...``, ``s320=...``; ``top1`` from Table 2."""
    return PaperFigures(
        source,
        (3, 224, 224),
        1000,
        params,
        {Setup(int(k[1:])): v for k, v in gflops.items()},
        {} if top1 is None else {Setup(224): {"top1": top1}},
    )


def _ssd(params: float, gflops: float, metrics: tuple[float, ...]) -> PaperFigures:
    """SSD300 on COCO: S-Table 1's row. Its params are those of 81 classes (background included), its GFLOPs
    those of a 91-output classifier (COCO's category ids 0..90; docs/paper.md s.4)."""
    return PaperFigures(
        _S_TABLE1,
        (3, 300, 300),
        81,
        params,
        {Setup(300): gflops},
        {Setup(300): dict(zip(COCO_METRICS, metrics))},
        gflops_num_classes=91,
    )


def _video(params: float, gflops: float, top1_err: float, top5_err: float) -> PaperFigures:
    """A Kinetics-400 network on 16x224x224 clips (S-Tables 2-3)."""
    return PaperFigures(
        _S_TABLE3,
        (3, 16, 224, 224),
        400,
        params,
        {Setup(224): gflops},
        {Setup(224): {"top1_err": top1_err, "top5_err": top5_err}},
    )


def _seg(params: float, os8: tuple[float, float, float], os16: tuple[float, float, float]) -> PaperFigures:
    """S-Table 6's row: params (M), then (mIoU, pixel accuracy, GFLOPs) at output strides 8 and 16."""
    return PaperFigures(
        _S_TABLE6,
        (3, 473, 473),
        150,
        params * 1e6,
        {Setup(473, 8): os8[2], Setup(473, 16): os16[2]},
        {Setup(473, s): {"miou": f[0], "pixel_acc": f[1]} for s, f in ((8, os8), (16, os16))},
        {"with_aux": True},
    )


PAPER: dict[str, PaperFigures] = {
    "resnet50": _imagenet(None, _TABLE2, top1=76.12),
    "resnet101": _imagenet(None, _TABLE2, top1=78.00),
    "resnet152": _imagenet(None, _TABLE2, top1=78.45),
    "pyconvresnet18": _imagenet(5_911_976, _AUTHORS, s224=0.88),
    "pyconvresnet34": _imagenet(11_091_048, _AUTHORS, s224=1.75),
    "pyconvresnet50": _imagenet(24_847_720, _TABLE2, top1=77.88, s224=3.88, s320=7.91),
    "pyconvresnet101": _imagenet(42.31e6, _TABLE2, top1=79.01, s224=7.31, s320=14.92),
    "pyconvresnet152": _imagenet(56_640_872, _AUTHORS, top1=79.52),
    "pyconvhgresnet50": _imagenet(25_234_728, _AUTHORS, top1=78.48),
    "pyconvhgresnet101": _imagenet(44_627_240, _AUTHORS, top1=79.22),
    "pyconvhgresnet152": _imagenet(60_657_960, _AUTHORS, top1=79.36),
    "inception_resnet_v2": PaperFigures(
        _S_TABLE5,
        (3, 299, 299),
        1000,
        55.84e6,
        {Setup(299): 16.75},
        {Setup(299): {"top1_err": 20.49, "top5_err": 5.29}},
    ),
    "pyconvinception": PaperFigures(
        _S_TABLE5,
        (3, 299, 299),
        1000,
        43.48e6,
        {Setup(299): 11.92},
        {Setup(299): {"top1_err": 20.31, "top5_err": 5.21}},
    ),
    "ssd50": _ssd(22.89e6, 20.92, (26.20, 43.97, 26.96, 8.12, 28.22, 42.64, 24.50, 35.41, 37.07, 12.61, 40.76, 57.25)),
    "pyconvssd50": _ssd(
        21.55e6, 19.71, (29.16, 47.26, 30.24, 9.31, 31.21, 47.79, 26.14, 37.81, 39.61, 13.79, 43.87, 60.98)
    ),
    "ssd101": _ssd(41.89e6, 48.45, (29.58, 47.69, 30.80, 9.38, 31.96, 47.64, 26.47, 38.00, 39.64, 14.09, 43.54, 61.03)),
    "pyconvssd101": _ssd(
        39.01e6, 45.02, (31.27, 50.00, 32.67, 10.65, 33.76, 51.75, 27.33, 39.33, 41.07, 15.48, 45.53, 63.44)
    ),
    "resnet3d50": _video(47.00e6, 93.26, 37.01, 15.41),
    "pyconvresnet3d50": _video(44.91e6, 91.81, 34.56, 13.34),
    "fcn50": _seg(35.42, (37.87, 78.17, 131.37), (36.84, 77.84, 39.52)),
    "deeplabv3_50": _seg(41.48, (40.91, 79.92, 151.17), (40.34, 79.44, 44.47)),
    "pspnet50": _seg(49.06, (41.24, 80.01, 165.42), (39.75, 79.17, 48.08)),
    "pyconvsegnet50": _seg(34.40, (41.54, 80.18, 116.84), (40.43, 79.45, 36.08)),
}
