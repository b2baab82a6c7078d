"""Video classification: the step, multi-view video-level evaluation, S-Section 2's recipe, one entry point.

``run(Params(...))`` is what both notebook 03 and ``python -m pyconv_core.run video`` call.
With ``data_dir`` it trains on Kinetics-400 with the paper's network and sampling (S-Section 2);
without, on the embedded moving-Fashion-MNIST set (``data/demo_video.py``) with a shallow network
of the same family (``stage_blocks`` 1,1,1,1) and small clips, so that a CPU run takes minutes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from pyconv_core.data.demo_video import DemoVideoConfig, make_demo_kinetics
from pyconv_core.data.kinetics import (
    KINETICS_MEAN,
    KINETICS_STD,
    ClipSampling,
    KineticsDataset,
    VideoBatch,
    collate_clips,
)
from pyconv_core.engine import distributed as dist
from pyconv_core.engine.logging import workbook_path
from pyconv_core.engine.trainer import FitResult, TrainConfig, check_run_dir, evaluate, fit, seed_everything
from pyconv_core.models.official import load_official_checkpoint
from pyconv_core.models.video import inflate_2d
from pyconv_core.registry import build, list_models
from pyconv_core.tasks.base import Recipe, RunParams, at_least, between, merge_recipe, one_of

__all__ = [
    "VideoTask",
    "Params",
    "RECIPES",
    "run",
    "datasets",
    "sampling",
    "train_config",
    "model_args",
    "build_model",
    "multiview_test",
    "predict_videos",
    "show_clips",
    "normalize",
    "VideoRecipe",
]


@dataclass(frozen=True)
class VideoRecipe(Recipe):
    frames: int = 16  # frames per clip
    crop: int = 224  # clip side; short sides scale as 256-320 to 224
    test_clips: int = 10  # at most this many uniform clips per test video
    stage_blocks: str = ""  # blocks per stage, e.g. "1,1,1,1"; empty: the depth's own (3,4,6,3 for 50 layers)


# S-Section 2: from scratch, SGD 0.9, wd 1e-4, lr 0.1 for 64 clips, x0.1 at 30/60/80 of 90 epochs.
# Milestones are fractions of the run's epochs, so a short run keeps the shape. "demo": the embedded
# set on a CPU: one block per stage, 4x32x32 clips, and a gentler lr for a short run on 9 classes.
_KINETICS = VideoRecipe(
    lr=0.1,
    lr_reference_batch=64,
    batch_size=64,
    epochs=90,
    weight_decay=1e-4,
    schedule="multistep",
    milestone_fractions=(30 / 90, 60 / 90, 80 / 90),
)
RECIPES: dict[str, VideoRecipe] = {
    "kinetics": _KINETICS,
    "demo": dataclasses.replace(
        _KINETICS, lr=0.02, batch_size=16, epochs=16, frames=4, crop=32, test_clips=2, stage_blocks="1,1,1,1"
    ),
}


def normalize(clips: torch.Tensor) -> torch.Tensor:
    """uint8 clips ``[N, 3, T, H, W]`` to float, standardized with the Kinetics mean and std."""
    mean = torch.tensor(KINETICS_MEAN, device=clips.device).view(1, 3, 1, 1, 1)
    std = torch.tensor(KINETICS_STD, device=clips.device).view(1, 3, 1, 1, 1)
    return (clips.float() / 255 - mean) / std


class VideoTask:
    """Cross-entropy on clips; evaluation averages the softmax over each video's clips and crops.

    ``eval_chunk`` bounds the clips per forward pass in evaluation (a test video has up to 30).
    """

    name = "video"
    main_metric = "top1"
    collate_fn = staticmethod(collate_clips)

    def __init__(self, eval_chunk: int = 30) -> None:
        self.eval_chunk = eval_chunk

    def train_step(self, model: nn.Module, batch: VideoBatch, device: torch.device) -> dict[str, torch.Tensor]:
        skipped = torch.tensor(float(batch.num_skipped))
        if len(batch.labels) == 0:
            zero = torch.stack([p.sum() for p in model.parameters()]).sum() * 0.0
            return {"loss": zero, "num_skipped": skipped}
        labels = batch.labels.repeat_interleave(batch.views).to(device, non_blocking=True)
        logits = model(normalize(batch.clips.to(device, non_blocking=True)))
        loss = F.cross_entropy(logits, labels)
        error = 100 * (logits.detach().argmax(1) != labels).float().mean()
        return {"loss": loss, "top1_err": error, "num_skipped": skipped}

    def scores(self, model: nn.Module, batch: VideoBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip logits ``[N, C]`` and per-video softmax averages ``[B, C]`` of a batch."""
        logits = torch.cat(
            [
                model(normalize(chunk.to(device, non_blocking=True))).float()
                for chunk in batch.clips.split(self.eval_chunk)
            ]
        )
        views = batch.views.to(device)
        video = torch.arange(len(views), device=device).repeat_interleave(views)
        summed = torch.zeros(len(views), logits.shape[1], device=device).index_add_(0, video, logits.softmax(1))
        return logits, summed / views[:, None]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        # video top-1 hits, top-5 hits, clip top-1 hits, clip loss sum, videos, clips, skipped
        totals = torch.zeros(7, dtype=torch.float64, device=device)
        for batch in loader:
            totals[6] += batch.num_skipped
            if len(batch.labels) == 0:
                continue
            logits, probs = self.scores(model, batch, device)
            labels = batch.labels.to(device)
            clip_labels = labels.repeat_interleave(batch.views.to(device))
            hits = probs.topk(min(5, probs.shape[1]), dim=1).indices == labels[:, None]
            totals[0] += hits[:, 0].sum()
            totals[1] += hits.any(dim=1).sum()
            totals[2] += (logits.argmax(1) == clip_labels).sum()
            totals[3] += F.cross_entropy(logits, clip_labels, reduction="sum")
            totals[4] += len(labels)
            totals[5] += len(clip_labels)
        c1, c5, clip1, loss, videos, clips, skipped = dist.all_reduce_sum(totals).tolist()
        videos, clips = max(videos, 1.0), max(clips, 1.0)
        return {
            "top1": 100 * c1 / videos,
            "top5": 100 * c5 / videos,
            "top1_err": 100 - 100 * c1 / videos,
            "top5_err": 100 - 100 * c5 / videos,
            "clip_top1_err": 100 - 100 * clip1 / clips,
            "val_loss": loss / clips,
            "num_videos": videos,
            "num_clips": clips,
            "num_skipped": skipped,
        }


@dataclass
class Params(RunParams):
    """The video experiment: the notebook's ``parameters`` cell and the launcher's flags. It follows the
    ``kinetics`` recipe (the paper's) with ``data_dir``, the CPU demo's without; None takes the recipe's value.
    """

    arch: str = "pyconvresnet3d50"  # pyconvresnet3d50 | resnet3d50
    data_dir: str = ""  # Kinetics layout (annotations/<split>.csv + <split>/...); empty: the embedded demo set
    batch_size: int | None = None  # global clips per step; None: the recipe's (kinetics 64, demo 16)
    lr: float | None = None  # per 64 clips, scaled linearly; None: the recipe's (kinetics 0.1, demo 0.02)
    # blocks per stage, e.g. "1,1,1,1"; empty: the depth's own (3,4,6,3); None: the recipe's (demo: 1,1,1,1)
    stage_blocks: str | None = None
    frames: int | None = None  # frames per clip; None: the recipe's (kinetics 16, demo 4)
    stride: int = 4  # take every stride-th frame (paper: 4)
    # clip side; None: the recipe's (kinetics 224, demo 32); short sides scale as 256-320 to 224
    crop: int | None = None
    test_clips: int | None = None  # at most this many uniform clips per test video; None: the recipe's (10, demo 2)
    test_crops: int = 3  # spatial crops per test clip
    test_batch_size: int = 4  # videos per step in the multi-view test
    test_videos: int = 0  # test on this many videos (evenly spread); 0: all
    dropout: float = 0.5
    checkpoint_2d: str = ""  # optional 2D ImageNet checkpoint (official layout) to inflate
    demo_dir: str = "data/demo_kinetics"  # demo set folder (reused if already there); relative to the workbook root
    demo_train_per_class: int = 32  # demo training videos per motion class
    demo_val_per_class: int = 8  # demo validation videos per motion class

    def check(self) -> None:
        super().check()
        one_of("arch", self.arch, list_models("video"))
        blocks = self.stage_blocks.split(",") if self.stage_blocks else ["1"] * 4
        if len(blocks) != 4 or not all(b.strip().isdigit() and int(b) >= 1 for b in blocks):
            raise ValueError(
                f"stage_blocks must be 4 block counts >= 1, one per stage (e.g. '1,1,1,1'; empty: the "
                f"depth's own; None: the recipe's), got {self.stage_blocks!r}"
            )
        for name in ("frames", "crop", "test_clips"):
            if getattr(self, name) is not None:
                at_least(name, getattr(self, name), 1, " (or None: the recipe's)")
        at_least("test_videos", self.test_videos, 0, " (0: all)")
        for name in ("stride", "test_crops", "test_batch_size", "demo_train_per_class", "demo_val_per_class"):
            at_least(name, getattr(self, name), 1)
        between("dropout", self.dropout, 0, 1)

    @property
    def demo(self) -> bool:
        return not self.data_dir

    def merged_recipe(self) -> VideoRecipe:
        return merge_recipe(RECIPES["demo" if self.demo else "kinetics"], self)

    @property
    def blocks(self) -> tuple[int, ...] | None:
        """Blocks per stage (None: the depth's own, 3,4,6,3)."""
        text = self.merged_recipe().stage_blocks
        return tuple(int(b) for b in text.split(",")) if text else None

    @property
    def model_name(self) -> str:
        """What is built, counted as the paper counts layers: the stem, three convolutions per
        bottleneck block and the classifier. ``pyconvresnet3d50`` with one block per stage is
        ``pyconvresnet3d14``: the demo network is not called by the paper's name."""
        if self.blocks is None:
            return self.arch
        return f"{self.arch.rstrip('0123456789')}{2 + 3 * sum(self.blocks)}"


def sampling(p: Params) -> ClipSampling:
    """Clip sampling of the experiment; short sides keep the paper's ratios to the crop (256-320 : 224).
    The demo set is never flipped: a mirror turns moving right into moving left, clockwise into anticlockwise."""
    r = p.merged_recipe()
    return ClipSampling(
        frames=r.frames,
        stride=p.stride,
        train_short_side=(round(r.crop * 256 / 224), round(r.crop * 320 / 224)),
        test_short_side=round(r.crop * 256 / 224),
        crop=r.crop,
        test_clips=r.test_clips,
        test_crops=p.test_crops,
        flip=not p.demo,
    )


def _root(p: Params) -> str:
    if p.data_dir:
        return p.data_dir
    demo = DemoVideoConfig(train_per_class=p.demo_train_per_class, val_per_class=p.demo_val_per_class)
    return str(make_demo_kinetics(workbook_path(p.demo_dir), demo))


def datasets(p: Params) -> tuple[KineticsDataset, KineticsDataset, list[str]]:
    """Training clips and validation clips (center clip and crop: the paper's training-time curves)."""
    root, s = _root(p), sampling(p)
    train = KineticsDataset(root, "train", sampling=s)
    return train, KineticsDataset(root, "val", sampling=s, classes=train.classes), train.classes


def test_set(p: Params, classes: Sequence[str]) -> Dataset:
    """The multi-view test: validation videos, up to ``test_clips`` x ``test_crops`` views each."""
    full = KineticsDataset(_root(p), "val", mode="test", sampling=sampling(p), classes=classes)
    if not p.test_videos or p.test_videos >= len(full):
        return full
    return Subset(full, np.linspace(0, len(full) - 1, p.test_videos).round().astype(int).tolist())


def train_config(p: Params) -> TrainConfig:
    """The TrainConfig of an experiment: its recipe (S-Section 2's, or the demo's), with the values its
    parameters set."""
    return p.train_config(f"{p.model_name}-{'demo' if p.demo else 'kinetics'}-s{p.seed}")


def model_args(p: Params, num_classes: int) -> dict[str, Any]:
    """Builder arguments of the experiment's network (classes, dropout, blocks per stage if shallower),
    shared by :func:`build_model` and the profiler (``profile_rows([p.arch], ..., **model_args(p, n))``)."""
    kwargs: dict[str, Any] = dict(num_classes=num_classes, dropout=p.dropout)
    if p.blocks:
        kwargs["stage_blocks"] = p.blocks
    return kwargs


def build_model(p: Params, num_classes: int) -> nn.Module:
    """The registered network (optionally shallower), inflated from a 2D checkpoint if one is given (not
    with ``weights``: the run then loads the whole model)."""
    model = build(p.arch, **model_args(p, num_classes))
    if p.checkpoint_2d and not p.weights:
        twin = build(p.arch.replace("3d", ""), **({"stage_blocks": p.blocks} if p.blocks else {}))
        inflate_2d(model, load_official_checkpoint(twin, p.checkpoint_2d))
    return model


def run(p: Params) -> FitResult:
    """Build data, model and recipe from ``p`` and train (in this process, or this torchrun rank)."""
    check_run_dir(train_config(p))  # before the data is read
    train, val, classes = datasets(p)
    seed_everything(p.seed)
    return fit(p.load_weights(build_model(p, len(classes))), VideoTask(), train, val, train_config(p))


def multiview_test(model: nn.Module, p: Params, classes: Sequence[str]) -> dict[str, float]:
    """Video-level top-1/top-5 over up to ``test_clips`` x ``test_crops`` views per validation video,
    softmax averaged (S-Section 2); run with the experiment's device, AMP and DDP sharding."""
    device, s = dist.init(), sampling(p)
    cfg = dataclasses.replace(train_config(p), batch_size=p.test_batch_size)
    return evaluate(
        model.to(device), VideoTask(eval_chunk=s.test_clips * s.test_crops), test_set(p, classes), cfg, device
    )


@torch.no_grad()
def predict_videos(model: nn.Module, dataset: Dataset, indices: Sequence[int]) -> torch.Tensor:
    """Per-video softmax averages ``[len(indices), C]`` (over the dataset's views) on the CPU, row k
    for ``indices[k]``; the row of a video that cannot be decoded is NaN (no other row moves)."""
    model.eval().cpu()
    items = [dataset[i] for i in indices]
    readable = [row for row, item in enumerate(items) if item is not None]
    if not readable:
        return torch.full((len(indices), 0), float("nan"))
    probs = VideoTask().scores(model, collate_clips(items), torch.device("cpu"))[1]
    out = probs.new_full((len(indices), probs.shape[1]), float("nan"))
    out[readable] = probs
    return out


def show_clips(
    dataset: Dataset,
    indices: Sequence[int],
    classes: Sequence[str],
    predictions: Mapping[str, torch.Tensor] | None = None,
) -> plt.Figure:
    """One frame strip per video (its first view), titled with the truth and each model's top guess
    (``predictions``: model name -> :func:`predict_videos` of the same ``indices``); a video that
    cannot be decoded keeps its row, marked as skipped."""
    fig, axes = plt.subplots(len(indices), 1, figsize=(12, 1.6 * len(indices)), squeeze=False)
    for row, (ax, i) in enumerate(zip(axes[:, 0], indices)):
        ax.axis("off")
        item = dataset[i]
        if item is None:
            ax.set_title(f"video {i}: unreadable, skipped", fontsize=9, loc="left")
            continue
        clips, label = item
        ax.imshow(torch.cat(list(clips[0].permute(1, 2, 3, 0)), dim=1).numpy())
        guesses = [
            f"{name}: {classes[int(probs[row].argmax())]} ({float(probs[row].max()):.0%})"
            for name, probs in (predictions or {}).items()
            if not probs[row].isnan().any()
        ]
        ax.set_title(" | ".join([f"true: {classes[label]}", *guesses]), fontsize=9, loc="left")
    fig.tight_layout()
    return fig
