"""Object detection: the SSD step, COCO evaluation, S-Section 1's recipe, and one entry point.

``run(Params(...))`` is what both the notebook and ``python -m pyconv_core.run detection`` call.
Evaluation is pycocotools' COCOeval on the validation split: the 12 numbers of S-Table 1, in
percent (-1 where a size range has no ground truth, as COCOeval reports it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from dataclasses import dataclass
from typing import cast

import numpy as np
import pandas as pd
import torch
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from pyconv_core.data.coco import CocoDetection, detection_collate
from pyconv_core.data.demo_detection import DemoDetectionConfig, make_demo_coco
from pyconv_core.engine import distributed as dist
from pyconv_core.engine.logging import workbook_path
from pyconv_core.engine.trainer import FitResult, TrainConfig, check_run_dir, fit, seed_everything
from pyconv_core.models.ssd import HEADS, SSD, load_backbone_checkpoint, map_sizes, match, multibox_loss, postprocess
from pyconv_core.paper import COCO_METRICS, PAPER
from pyconv_core.registry import build
from pyconv_core.tasks.base import Recipe, RunParams, at_least, between, check_model, merge_recipe, one_of
from pyconv_core.tasks.classification import resolve_backbone_weights

__all__ = [
    "DetectionTask",
    "Params",
    "RECIPES",
    "run",
    "datasets",
    "train_config",
    "build_model",
    "predict",
    "paper_table",
    "untrained_metrics",
    "browse",
    "DetectionRecipe",
]


@dataclass(frozen=True)
class DetectionRecipe(Recipe):
    max_expand: float = 1.0  # SSD's zoom-out augmentation up to this factor (1: off)


# S-Section 1: SGD 0.9, wd 5e-4, lr 0.02 for batch 256 (scaled linearly), linear warmup over epoch 1,
# lr x0.1 before epochs 86 and 108 of 130 (fractions of the run, so a short run keeps the shape);
# SSD's random crop, colour jitter and flip, no zoom-out ("max_expand" 1; SSD's own is 4).
# "demo": the CPU demo, from the Fashion-MNIST backbone on the embedded set in a few epochs: short warmup, cosine.
RECIPES: dict[str, DetectionRecipe] = {
    "paper": DetectionRecipe(
        lr=0.02,
        lr_reference_batch=256,
        batch_size=256,
        epochs=130,
        weight_decay=5e-4,
        schedule="multistep",
        milestone_fractions=(85 / 130, 107 / 130),
        warmup_epochs=1.0,
    ),
    "demo": DetectionRecipe(
        lr=0.48,
        lr_reference_batch=256,
        batch_size=16,
        epochs=3,
        weight_decay=5e-4,
        schedule="cosine",
        warmup_epochs=0.5,
    ),
}


def _unwrap(model: nn.Module) -> SSD:
    """The SSD inside DDP and/or torch.compile wrappers (for its default boxes)."""
    while not isinstance(model, SSD):
        model = cast(nn.Module, getattr(model, "_orig_mod", None) or model.module)
    return model


def _coco_dataset(loader: DataLoader) -> CocoDetection:
    dataset = loader.dataset
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if not isinstance(dataset, CocoDetection):
        raise TypeError(
            f"COCO evaluation needs a CocoDetection validation set (or a Subset of one), got {type(dataset).__name__}"
        )
    return dataset


class DetectionTask:
    """SSD's MultiBox loss for training; detections scored by COCOeval for evaluation."""

    name = "detection"
    main_metric = "AP"
    collate_fn = staticmethod(detection_collate)

    def __init__(
        self, score_threshold: float = 0.05, nms_iou: float = 0.5, top_k: int = 200, neg_ratio: int = 3
    ) -> None:
        self.score_threshold, self.nms_iou, self.top_k, self.neg_ratio = score_threshold, nms_iou, top_k, neg_ratio

    def train_step(self, model: nn.Module, batch, device: torch.device) -> dict[str, torch.Tensor]:
        images, targets, skipped = batch
        skipped_t = torch.tensor(float(skipped))
        if not targets:
            zero = torch.stack([p.sum() for p in model.parameters()]).sum() * 0.0
            return {"loss": zero, "num_skipped": skipped_t}
        priors = _unwrap(model).priors
        matched = [match(t["boxes"].to(device), t["labels"].to(device), priors) for t in targets]
        boxes, labels = (torch.stack(m) for m in zip(*matched))
        loc, logits = model(images.to(device, non_blocking=True))
        losses = multibox_loss(loc, logits, boxes, labels, priors, self.neg_ratio)
        losses["num_positives"] = (labels > 0).sum().float()
        losses["num_skipped"] = skipped_t
        return losses

    def detect(self, model: nn.Module, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Post-processed detections (normalized xyxy boxes, scores, labels) for a batch."""
        loc, logits = model(images)
        return postprocess(loc, logits, _unwrap(model).priors, self.score_threshold, self.nms_iou, self.top_k)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        """COCOeval over the loader's images; under DDP every process gathers all detections first
        (keyed by image id, so the sampler's padding duplicates count once). Unreadable images are
        left out of COCOeval and counted as ``num_skipped``."""
        dataset = _coco_dataset(loader)
        results: dict[int, list[dict]] = {}
        skipped = 0
        for images, targets, num_skipped in loader:
            skipped += num_skipped
            if not targets:
                continue
            for target, det in zip(targets, self.detect(model, images.to(device))):
                height, width = target["orig_size"]
                boxes = det["boxes"].cpu().double() * torch.tensor([width, height, width, height])
                results[target["image_id"]] = [
                    {
                        "image_id": target["image_id"],
                        "category_id": dataset.label_to_cat[int(label)],
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": float(score),
                    }
                    for (x0, y0, x1, y1), score, label in zip(boxes.tolist(), det["scores"], det["labels"])
                ]
        if dist.is_distributed():
            gathered: list[dict] = [{} for _ in range(dist.world_size())]
            torch.distributed.all_gather_object(gathered, results)
            results = {k: v for part in gathered for k, v in part.items()}
        total_skipped = float(dist.all_reduce_sum(torch.tensor([float(skipped)], device=device))[0])
        return {**coco_metrics(dataset, results), "num_skipped": total_skipped}


def coco_metrics(dataset: CocoDetection, results: dict[int, list[dict]]) -> dict[str, float]:
    """COCOeval's 12 numbers (percent) over the images in ``results`` (image id -> its detections)."""
    detections = [d for dets in results.values() for d in dets]
    metrics = {"num_images": float(len(results)), "num_detections": float(len(detections))}
    if not detections:
        return {**{k: 0.0 for k in COCO_METRICS}, **metrics}
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(dataset.coco, dataset.coco.loadRes(detections), "bbox")
        evaluator.params.imgIds = sorted(results)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [100 * float(v) if v >= 0 else -1.0 for v in evaluator.stats]
    return {**dict(zip(COCO_METRICS, stats)), **metrics}


def paper_table(metrics: dict[str, float], model_name: str, untrained: dict[str, float] | None = None) -> pd.DataFrame:
    """Our 12 COCO numbers beside S-Table 1's row for ``model_name`` (and the untrained model's, if given)."""
    columns = {} if untrained is None else {"untrained": [untrained.get(k, np.nan) for k in COCO_METRICS]}
    columns["ours"] = [metrics.get(k, np.nan) for k in COCO_METRICS]
    paper = PAPER[model_name].metrics_at() if model_name in PAPER else {}
    columns[f"paper {model_name}"] = [paper.get(k, np.nan) for k in COCO_METRICS]
    return pd.DataFrame(columns, index=list(COCO_METRICS)).round(2)


@dataclass
class Params(RunParams):
    """The detection experiment: the notebook's ``parameters`` cell and the launcher's flags."""

    arch: str = "pyconvssd"  # ssd | pyconvssd (or a full registered name such as pyconvssd50)
    depth: int = 18  # backbone depth: 50 or 101 (paper), 18 (CPU demo)
    data_dir: str = ""  # COCO-layout folder; empty: the embedded demo set (generated under data/)
    image_size: int = 64  # model input side; 300 is SSD300 (paper)
    augment: bool = False  # SSD's augmentation (colour jitter, min-IoU crop, flip, zoom-out); paper: on
    max_expand: float | None = None  # SSD's zoom-out augmentation up to this factor (1: off); None: the recipe's
    recipe: str = "demo"  # paper | demo
    batch_size: int | None = None  # global batch over all processes; None: the recipe's (paper 256, demo 16)
    lr: float | None = None  # per the recipe's reference batch of 256, scaled linearly; None: the recipe's
    # classifier checkpoint of the backbone (authors', torchvision or workbook layout); "fashion-mnist": the
    # classification demo's run (trained if missing); "": from scratch
    backbone_weights: str = ""
    demo_dir: str = "data/demo_coco"  # demo set folder (reused if already there); relative to the workbook root
    demo_train: int = 8192  # demo training images
    demo_val: int = 64  # demo validation images
    demo_image_size: int = 64  # side of the demo images
    score_threshold: float = 0.05  # detections below are dropped before NMS
    nms_iou: float = 0.5
    top_k: int = 200  # detections kept per image
    eval_every: int = 3  # COCO evaluations are costly: every 3 epochs (and after the last)

    ARCHS = tuple(HEADS)  # arch families, completed by depth

    def check(self) -> None:
        super().check()
        check_model("arch", self.arch, self.ARCHS, self.depth, "detection")
        one_of("recipe", self.recipe, tuple(RECIPES))
        head = HEADS[self.model_name.rstrip("0123456789")]
        if len(map_sizes(self.image_size, head)) < 2:
            smallest = next(side for side in range(1, 1024) if len(map_sizes(side, head)) >= 2)
            raise ValueError(
                f"image_size must be >= {smallest} (SSD needs at least two detection maps), got {self.image_size}"
            )
        if self.max_expand is not None:
            at_least("max_expand", self.max_expand, 1, " (or None: the recipe's)")
        for name in ("demo_train", "demo_val", "demo_image_size", "top_k"):
            at_least(name, getattr(self, name), 1)
        between("score_threshold", self.score_threshold, 0, 1)
        between("nms_iou", self.nms_iou, 0, 1)

    def merged_recipe(self) -> DetectionRecipe:
        return merge_recipe(RECIPES[self.recipe], self)

    @property
    def model_name(self) -> str:
        return self.arch if self.arch[-1].isdigit() else f"{self.arch}{self.depth}"

    @property
    def paper_model(self) -> str:
        """The S-Table 1 row to compare with: the same head at depth 101, else 50."""
        return f"{self.model_name.rstrip('0123456789')}{101 if self.model_name.endswith('101') else 50}"


def datasets(p: Params) -> tuple[CocoDetection, CocoDetection]:
    """Train and validation sets: COCO (train2017/val2017) or the generated demo set. Both annotation
    files are checked here, before training; they must list the same categories (the model's labels
    are the training file's)."""
    root = p.data_dir or make_demo_coco(
        workbook_path(p.demo_dir),
        DemoDetectionConfig(num_train=p.demo_train, num_val=p.demo_val, image_size=p.demo_image_size),
    )
    expand = p.merged_recipe().max_expand
    train = CocoDetection(root, "train2017", train=p.augment, size=p.image_size, skip_empty=True, max_expand=expand)
    val = CocoDetection(root, "val2017", train=False, size=p.image_size)
    listed = [{(c, data.coco.cats[c]["name"]) for c in data.cat_to_label} for data in (train, val)]
    if listed[0] != listed[1]:
        differ = sorted(listed[0] ^ listed[1])
        raise ValueError(
            f"{val.ann_file} and {train.ann_file} list different categories (id, name), e.g. "
            f"{differ[:5]}: the model's labels are the training file's, so give both files the same "
            f"categories list"
        )
    return train, val


def train_config(p: Params) -> TrainConfig:
    """The TrainConfig of an experiment: its recipe, with the values its parameters set."""
    return p.train_config(f"{p.model_name}-{p.recipe}-s{p.seed}")


_BACKBONE_FAMILY = {"ssd": "resnet", "pyconvssd": "pyconvresnet"}


def _backbone_weights(p: Params) -> str:
    """``p.backbone_weights`` as a path (the Fashion-MNIST demo backbone is trained if it is missing)."""
    family = _BACKBONE_FAMILY[p.model_name.rstrip("0123456789")]
    depth = int(p.model_name[len(p.model_name.rstrip("0123456789")) :])
    return resolve_backbone_weights(p.backbone_weights, family, depth, p.runs_dir)


def build_model(p: Params, num_classes: int) -> SSD:
    """The registered SSD for the parameters, with its backbone's ImageNet weights if given (not with
    ``weights``: the run then loads the whole model)."""
    model = cast(SSD, build(p.model_name, num_classes=num_classes, image_size=p.image_size))
    if p.backbone_weights and not p.weights:
        load_backbone_checkpoint(model, _backbone_weights(p))
    return model


def run(p: Params) -> FitResult:
    """Build data, model and recipe from ``p`` and train (in this process, or this torchrun rank)."""
    if not p.weights:
        p = dataclasses.replace(p, backbone_weights=_backbone_weights(p))  # may train it: before seeding
    check_run_dir(train_config(p))  # before the data is read
    train, val = datasets(p)
    seed_everything(p.seed)
    model = build_model(p, len(train.class_names))
    task = DetectionTask(p.score_threshold, p.nms_iou, p.top_k)
    return fit(p.load_weights(model), task, train, val, train_config(p))


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: CocoDetection,
    indices: list[int],
    score_threshold: float = 0.3,
    task: DetectionTask | None = None,
) -> list[dict]:
    """Detections above ``score_threshold`` and ground truth, in the original image's pixels, for
    drawing: one dict per index (in order) with ``index``, ``name`` (the file), ``image`` (uint8 HWC),
    ``pred`` and ``truth`` (boxes, labels[, scores]); for an image that cannot be decoded ``image`` is
    None and there are no boxes, so the other samples keep their places."""
    task = task or DetectionTask()
    model.eval()
    out = []
    for i in indices:
        name = dataset.items[i][1]
        sample = dataset[i]
        if sample is None:
            out.append({"index": i, "name": name, "image": None})
            continue
        image, target = sample
        height, width = target["orig_size"]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        det = task.detect(model, image[None])[0]
        keep = det["scores"] >= score_threshold
        raw, truth_boxes, truth_labels = dataset.read(i)
        out.append(
            {
                "index": i,
                "name": name,
                "image": raw.permute(1, 2, 0).numpy(),
                "pred": {
                    "boxes": det["boxes"][keep] * scale,
                    "labels": det["labels"][keep],
                    "scores": det["scores"][keep],
                },
                "truth": {"boxes": truth_boxes, "labels": truth_labels},
            }
        )
    return out


def untrained_metrics(p: Params, val: Dataset, num_classes: int) -> dict[str, float]:
    """COCO metrics of the freshly initialized model (same seed): the floor a run must rise above."""
    torch.manual_seed(p.seed)
    model = build_model(p, num_classes).eval()
    loader = DataLoader(val, batch_size=p.merged_recipe().batch_size, collate_fn=detection_collate)
    return DetectionTask(p.score_threshold, p.nms_iou, p.top_k).evaluate(model, loader, torch.device("cpu"))


def browse(model: nn.Module, dataset: CocoDetection, threshold: float = 0.3) -> None:
    """ipywidgets browser over the images of ``dataset`` and score thresholds (predictions vs truth)."""
    from pyconv_core.plots import browse_detections

    browse_detections(
        lambda index, t: predict(model, dataset, [index], t)[0], len(dataset), dataset.class_names, threshold
    )
