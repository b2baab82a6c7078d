"""ResNet3D-50 and PyConvResNet3D-50 for video (supplementary S-Section 2, S-Table 2; docs/paper.md s.5).

Both come from the one ResNet builder with ``dim=3``: a 5x7x7 stem with stride (1,2,2), the
S-Table 2 stage presets with (t, k, k) kernels, temporal stride 2 in stages 3 and 4 (16 frames
give 16, 16, 8, 4 frames per stage) and dropout 0.5 before the classifier. As in 2D
(docs/paper.md s.2), S-Table 2 prints the 1x3x3 max pool in the ResNet3D column only: PyConvResNet3D
downsamples in its first PyConv instead, with max-pool shortcuts, which also reproduces the
paper's GFLOPs (91.56 measured against 91.81, where a stem max pool would give 90.92).

Parameter counts: ResNet3D-50 has 46,999,760 (47.00M). PyConvResNet3D-50 with the Kinetics-400
classifier has 45,373,072, 1.03% above the paper's 44.91M; the paper's figure is exactly this
network with a 174-class classifier (44,909,998 = 45,373,072 - 226 x 2049), the class count of
Something-Something-v2, so it was likely counted on that head.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from pyconv_core.layers.pyconv import LevelSet
from pyconv_core.models.resnet import ResNet
from pyconv_core.registry import register_model

__all__ = ["VIDEO_LEVELS", "VIDEO_ARGS", "video_resnet", "inflate_2d", "resnet3d50", "pyconvresnet3d50"]

# S-Table 2, per stage: kernels (t, k, k) in increasing size, groups, and output shares
# (stage 1: 16 channels each of 64; stage 2: 32, 32, 64 of 128; stage 3: 128, 128; stage 4: 512).
VIDEO_LEVELS: dict[str, tuple[LevelSet, ...]] = {
    "resnet": (LevelSet(((3, 3, 3),), (1,), (1,)),) * 4,
    "pyconvresnet": (
        LevelSet(((3, 3, 3), (3, 5, 5), (5, 7, 7), (7, 9, 9)), (1, 4, 8, 16), (1, 1, 1, 1)),
        LevelSet(((3, 3, 3), (3, 5, 5), (5, 7, 7)), (1, 4, 8), (1, 1, 2)),
        LevelSet(((3, 3, 3), (3, 5, 5)), (1, 4), (1, 1)),
        LevelSet(((3, 3, 3),), (1,), (1,)),
    ),
}

# Stem and stage strides (t, h, w): outputs 16x112x112 (stem), then 16x56x56, 16x28x28, 8x14x14, 4x7x7.
VIDEO_ARGS: dict[str, dict] = {
    "resnet": dict(stem_pool=((1, 3, 3), (1, 2, 2), (0, 1, 1)), stage_strides=(1, (1, 2, 2), 2, 2)),
    "pyconvresnet": dict(stem_pool=None, stage_strides=((1, 2, 2), (1, 2, 2), 2, 2)),
}


def video_resnet(family: str, depth: int = 50, **kw) -> ResNet:
    """A 3D network of S-Table 2's design: ``family`` is ``resnet`` or ``pyconvresnet``; keyword
    arguments override the defaults (400 classes, dropout 0.5) and the ResNet builder's options,
    e.g. ``stage_blocks=(1, 1, 1, 1)`` for a shallow network with the same stages."""
    args = dict(
        num_classes=400,
        dropout=0.5,
        dim=3,
        stem_kernel=(5, 7, 7),
        stem_stride=(1, 2, 2),
        stage_levels=VIDEO_LEVELS[family],
        **VIDEO_ARGS[family],
    )
    args.update(kw)
    return ResNet(family, depth, **args)


@register_model(task="video", input_shape=(3, 16, 224, 224))
def resnet3d50(**kw) -> ResNet:
    """ResNet3D-50 (S-Table 2): Kinetics-400 top-1/top-5 error 37.01/15.41 (S-Table 3)."""
    return video_resnet("resnet", **kw)


@register_model(task="video", input_shape=(3, 16, 224, 224))
def pyconvresnet3d50(**kw) -> ResNet:
    """PyConvResNet3D-50 (S-Table 2): Kinetics-400 top-1/top-5 error 34.56/13.34 (S-Table 3)."""
    return video_resnet("pyconvresnet", **kw)


@torch.no_grad()
def inflate_2d(model: nn.Module, source: nn.Module | Mapping[str, torch.Tensor]) -> list[str]:
    """Initialize a 3D network from its 2D counterpart (I3D inflation, Carreira & Zisserman 2017).

    ``source`` is the 2D network of the same family (e.g. ``build("pyconvresnet50")`` after
    ``load_official_checkpoint``) or its state_dict: both networks come from the same builder,
    so their keys agree. A k x k kernel becomes t x k x k, repeated over time and divided by t,
    so that a clip of identical frames gives the 2D responses. The classifier is copied only when
    the class counts agree; the keys left at their initialization are returned.
    """
    state = source.state_dict() if isinstance(source, nn.Module) else dict(source)
    kept = []
    for key, value in model.state_dict().items():
        src = state.get(key)
        if src is not None and src.shape == value.shape:
            value.copy_(src)
        elif src is not None and src.dim() + 1 == value.dim() == 5 and value.shape[:2] + value.shape[3:] == src.shape:
            value.copy_(src.unsqueeze(2).expand_as(value) / value.shape[2])
        else:
            kept.append(key)
    unmatched = [k for k in kept if not k.startswith("fc.")]
    if unmatched:
        raise ValueError(
            f"inflate_2d: {len(unmatched)} tensors of the 3D network have no 2D counterpart of the right "
            f"shape in the source (e.g. {unmatched[:4]}); pass the 2D network of the same family and "
            f"blocks (resnet50 for resnet3d50, pyconvresnet50 for pyconvresnet3d50)"
        )
    return kept
