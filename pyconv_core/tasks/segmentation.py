"""Semantic segmentation: the step (main + 0.4 x auxiliary cross-entropy), sliding-window
evaluation in mIoU and pixel accuracy, the recipes, one entry point, and what notebook 04 shows.

Metrics come from one confusion matrix summed over batches and processes (``all_reduce_sum``),
so a sharded evaluation equals a single-process one. mIoU averages the IoU of the classes that
occur in the ground truth or the prediction (on ADE20K val: all 150); pixel accuracy counts
every non-ignored pixel.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pyconv_core.data.ade20k import ADE20K, IGNORE_INDEX, TrainTransform, denormalize
from pyconv_core.data.demo_segmentation import make_demo_ade20k
from pyconv_core.engine import distributed as dist
from pyconv_core.engine.logging import workbook_path
from pyconv_core.engine.trainer import FitResult, TrainConfig, check_run_dir, fit, seed_everything
from pyconv_core.models.segmentation import MODEL_HEADS
from pyconv_core.paper import PAPER
from pyconv_core.profile import profile_rows
from pyconv_core.registry import build
from pyconv_core.tasks.base import Recipe, RunParams, at_least, check_model, merge_recipe, one_of
from pyconv_core.tasks.classification import resolve_backbone_weights

__all__ = [
    "SegmentationTask",
    "Params",
    "RECIPES",
    "NEW_MODULES",
    "MULTI_SCALES",
    "run",
    "datasets",
    "train_config",
    "task_for",
    "build_model",
    "collate",
    "confusion_matrix",
    "scores",
    "class_iou_table",
    "predict",
    "evaluate_dataset",
    "segmentation_sample",
    "head_to_head",
    "SegmentationRecipe",
]


@dataclass(frozen=True)
class SegmentationRecipe(Recipe):
    head_lr_scale: float = 1.0  # lr factor of the modules new on the backbone (NEW_MODULES)
    aux_weight: float = 0.4  # weight of the auxiliary head's loss
    crop: int = 473  # training crop
    test_crop: int = 473  # sliding-window crop
    base_size: int = 512  # test long side before scaling; 0: keep the image's size
    scale: tuple[float, float] = (0.5, 2.0)  # training scale range
    rotate: tuple[float, float] = (-10.0, 10.0)  # training rotation range (degrees)


# docs/paper.md s.6 (the authors' config): poly 0.9 from lr 0.01 at batch 16, 100 epochs, SyncBN, aux 0.4;
# crop 473 after scale 0.5-2.0 and rotation +-10; test on a 512 long side with 473 sliding crops.
# Their semseg training code also trains the modules new on the ImageNet backbone (head, classifier,
# aux head) at 10x the lr. "demo" is the same recipe sized for the embedded set on a CPU
# (docs/segmentation_demo.md has the measurements): its images (48-72 px) are far smaller than ADE20K's,
# so it works on them at about 2x (training scale 1.75-2.5, test long side 144), where output stride 8
# leaves 12x12 features per 97 px crop (7x7 at their own size: 4 per item, too coarse to outline one);
# no rotation (the demo's items are upright), a higher lr for a short run, and no 10x (no gain here).
RECIPES: dict[str, SegmentationRecipe] = {
    "ade20k": SegmentationRecipe(
        lr=0.01,
        lr_reference_batch=16,
        batch_size=16,
        epochs=100,
        weight_decay=1e-4,
        schedule="poly",
        head_lr_scale=10.0,
    ),
    "demo": SegmentationRecipe(
        lr=0.2,
        lr_reference_batch=16,
        batch_size=16,
        epochs=22,
        weight_decay=1e-4,
        schedule="poly",
        crop=97,
        test_crop=145,
        base_size=144,
        scale=(1.75, 2.5),
        rotate=(0.0, 0.0),
    ),
}
NEW_MODULES = ("head.", "classifier.", "aux.")  # SegmentationNet's parameters outside the backbone
MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def collate(batch: list) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """``(image, mask)`` items (``None`` for an unreadable one) as lists of images and masks (training
    crops share a size, full validation images do not) and the count of unreadable items left out."""
    good = [sample for sample in batch if sample is not None]
    return [image for image, _ in good], [mask for _, mask in good], len(batch) - len(good)


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """``[C, C]`` int64 counts of (true class, predicted class) over the non-ignored pixels."""
    keep = target != ignore_index
    target, pred = target[keep].long(), pred[keep].long()
    if len(target) and (int(target.max()) >= num_classes or int(target.min()) < 0):
        raise ValueError(
            f"mask holds class {int(target.max())} outside 0..{num_classes - 1} (and not the "
            f"ignore index {ignore_index}): num_classes does not match the data"
        )
    return torch.bincount(target * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)


def scores(confusion: torch.Tensor) -> dict:
    """mIoU, pixel accuracy and mean class accuracy (in %), plus per-class ``iou`` and ``acc``
    tensors (NaN for classes absent from both ground truth and prediction)."""
    conf = confusion.double()
    hits, truth, predicted = conf.diag(), conf.sum(1), conf.sum(0)
    union = truth + predicted - hits
    iou = torch.where(union > 0, hits / union.clamp(min=1), torch.nan)
    acc = torch.where(truth > 0, hits / truth.clamp(min=1), torch.nan)
    return {
        "miou": 100 * float(iou.nanmean()) if (union > 0).any() else 0.0,
        "pixel_acc": 100 * float(hits.sum() / conf.sum().clamp(min=1)),
        "mean_acc": 100 * float(acc.nanmean()) if (truth > 0).any() else 0.0,
        "iou": iou,
        "acc": acc,
    }


def class_iou_table(confusion: torch.Tensor, class_names: Sequence[str]) -> list[dict]:
    """One row per class: name, IoU and accuracy in % (None when the class never occurs), pixels."""
    s = scores(confusion)
    pixels = confusion.sum(1).tolist()
    return [
        {
            "class": name,
            "iou": None if math.isnan(i) else 100 * i,
            "acc": None if math.isnan(a) else 100 * a,
            "pixels": n,
        }
        for name, i, a, n in zip(class_names, s["iou"].tolist(), s["acc"].tolist(), pixels)
    ]


def _sliding_window(
    model: nn.Module, image: torch.Tensor, num_classes: int, crop: int, flip: bool, stride_rate: float, max_batch: int
) -> torch.Tensor:
    """Softmax ``[C, H, W]`` averaged over overlapping ``crop`` windows (the image padded with the
    mean to at least ``crop``), each with its mirror image if ``flip``."""
    h, w = image.shape[-2:]
    pad_h, pad_w = max(crop - h, 0), max(crop - w, 0)
    image = F.pad(image, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    H, W = image.shape[-2:]
    stride = math.ceil(crop * stride_rate)
    tops = [min(i * stride, H - crop) for i in range(math.ceil(max(H - crop, 0) / stride) + 1)]
    lefts = [min(j * stride, W - crop) for j in range(math.ceil(max(W - crop, 0) / stride) + 1)]
    windows = [(top, left) for top in tops for left in lefts]
    probs = image.new_zeros(num_classes, H, W, dtype=torch.float32)
    count = image.new_zeros(1, H, W, dtype=torch.float32)
    for start in range(0, len(windows), max_batch):
        chunk = windows[start : start + max_batch]
        crops = torch.stack([image[:, top : top + crop, left : left + crop] for top, left in chunk])
        out = model(torch.cat([crops, crops.flip(-1)]) if flip else crops).float().softmax(1)
        if flip:
            out = (out[: len(chunk)] + out[len(chunk) :].flip(-1)) / 2
        for (top, left), p in zip(chunk, out):
            probs[:, top : top + crop, left : left + crop] += p
            count[:, top : top + crop, left : left + crop] += 1
    probs /= count
    return probs[:, pad_h // 2 : pad_h // 2 + h, pad_w // 2 : pad_w // 2 + w]


@torch.no_grad()
def predict(
    model: nn.Module,
    image: torch.Tensor,
    num_classes: int,
    crop: int = 473,
    base_size: int = 512,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    stride_rate: float = 2 / 3,
    max_batch: int = 8,
) -> torch.Tensor:
    """Class probabilities ``[C, H, W]`` of one normalized image ``[3, H, W]`` (PSPNet's test).

    At each scale the long side is resized to ``scale * base_size`` (``base_size`` 0: the image's
    own long side), predicted with sliding ``crop`` windows (stride ``crop * stride_rate``),
    resized back; the scales are averaged. Multi-scale + flip: ``scales=MULTI_SCALES, flip=True``.
    """
    h, w = image.shape[-2:]
    total = image.new_zeros(num_classes, h, w, dtype=torch.float32)
    for scale in scales:
        long_side = round(scale * (base_size or max(h, w)))
        size = (long_side, round(long_side * w / h)) if h > w else (round(long_side * h / w), long_side)
        scaled = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        probs = _sliding_window(model, scaled, num_classes, crop, flip, stride_rate, max_batch)
        total += F.interpolate(probs[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return total / len(scales)


class SegmentationTask:
    """Pixel-wise cross-entropy (ignore 255) of the logits plus ``aux_weight`` x that of the
    auxiliary head; evaluation by :func:`predict` into a confusion matrix."""

    name = "segmentation"
    main_metric = "miou"
    collate_fn = staticmethod(collate)

    def __init__(
        self,
        num_classes: int,
        aux_weight: float = 0.4,
        crop: int = 473,
        base_size: int = 512,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.num_classes, self.aux_weight, self.ignore_index = num_classes, aux_weight, ignore_index
        self.crop, self.base_size, self.scales, self.flip = crop, base_size, tuple(scales), flip

    def train_step(self, model: nn.Module, batch, device: torch.device) -> dict[str, torch.Tensor]:
        images, masks, skipped = batch
        skipped_t = torch.tensor(float(skipped))
        if not images:
            zero = torch.stack([p.sum() for p in model.parameters()]).sum() * 0.0
            return {"loss": zero, "num_skipped": skipped_t}
        images, masks = (torch.stack(b).to(device, non_blocking=True) for b in (images, masks))
        out = model(images)
        logits, aux = (out["out"], out["aux"]) if isinstance(out, dict) else (out, None)
        main_loss = F.cross_entropy(logits, masks, ignore_index=self.ignore_index)
        if aux is None:
            return {"loss": main_loss, "main_loss": main_loss.detach(), "num_skipped": skipped_t}
        aux_loss = F.cross_entropy(aux, masks, ignore_index=self.ignore_index)
        return {
            "loss": main_loss + self.aux_weight * aux_loss,
            "main_loss": main_loss.detach(),
            "aux_loss": aux_loss.detach(),
            "num_skipped": skipped_t,
        }

    @torch.no_grad()
    def confusion(self, model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, int]:
        """The confusion matrix over ``loader`` and the number of unreadable items skipped, both
        summed over all processes."""
        total = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)
        skipped = torch.zeros((), dtype=torch.int64, device=device)
        for images, masks, num_skipped in loader:
            skipped += num_skipped
            for image, mask in zip(images, masks):
                probs = predict(
                    model, image.to(device), self.num_classes, self.crop, self.base_size, self.scales, self.flip
                )
                total += confusion_matrix(probs.argmax(0), mask.to(device), self.num_classes, self.ignore_index)
        return dist.all_reduce_sum(total), int(dist.all_reduce_sum(skipped))

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        """mIoU, pixel accuracy and mean class accuracy (%) over ``loader`` and all processes, and
        ``num_skipped`` (unreadable images or masks)."""
        confusion, skipped = self.confusion(model, loader, device)
        s = scores(confusion)
        return {
            "miou": s["miou"],
            "pixel_acc": s["pixel_acc"],
            "mean_acc": s["mean_acc"],
            "num_skipped": float(skipped),
        }


@dataclass
class Params(RunParams):
    """The segmentation experiment: the notebook's ``parameters`` cell and the launcher's flags."""

    head: str = "pyconvsegnet"  # pyconvsegnet | pspnet | deeplabv3 | fcn (the heads of S-Table 6)
    depth: int = 18  # backbone layers: 18 (CPU demo) or 50, 101, 152 (the paper)
    backbone: str = "pyconvresnet"  # resnet | pyconvresnet
    output_stride: int = 8  # 8 or 16
    data_dir: str = ""  # ADEChallengeData2016 folder; empty: the embedded demo set
    demo_dir: str = "data/demo_ade20k"  # demo set folder (reused if already there); relative to the workbook root
    demo_train: int = 400  # demo training images
    demo_val: int = 80  # demo validation images
    recipe: str = "demo"  # ade20k | demo (RECIPES)
    batch_size: int | None = None  # global batch; None: the recipe's (16)
    lr: float | None = None  # per a batch of 16, scaled linearly; None: the recipe's (ade20k 0.01, demo 0.2)
    # lr factor of head, classifier and aux head; None: the recipe's (ade20k 10 as the authors' code, demo 1)
    head_lr_scale: float | None = None
    sync_bn: bool = True  # SyncBatchNorm under torchrun on GPUs (PyTorch's is GPU-only)
    crop: int | None = None  # training crop; None: the recipe's (473 / 97)
    test_crop: int | None = None  # sliding-window crop; None: the recipe's (473 / 145: one window per demo image)
    base_size: int | None = None  # test long side before scaling, 0: keep the size; None: the recipe's (512 / 144)
    multi_scale: bool = False  # test at scales 0.5..1.75 with flip, else single scale
    eval_every: int = 3  # evaluate every this many epochs (and after the last): time for training in a demo run
    train_subset: int = 0  # training images (0: all)
    val_subset: int = 0  # validation images (0: all)
    # classifier checkpoint of the backbone (authors', torchvision or workbook layout); "fashion-mnist": the
    # classification demo's run (trained if missing); "": from scratch
    backbone_weights: str = ""

    def check(self) -> None:
        super().check()
        check_model("head", self.head, tuple(MODEL_HEADS), self.depth, "segmentation", full_names=False)
        one_of("backbone", self.backbone, ("resnet", "pyconvresnet"))
        one_of("output_stride", self.output_stride, (8, 16))
        one_of("recipe", self.recipe, tuple(RECIPES))
        for name, low in (("head_lr_scale", 0), ("crop", 1), ("test_crop", 1), ("base_size", 0)):
            if getattr(self, name) is not None:
                at_least(name, getattr(self, name), low, " (or None: the recipe's)")
        for name in ("train_subset", "val_subset"):
            at_least(name, getattr(self, name), 0, " (0: all)")
        for name in ("demo_train", "demo_val"):
            at_least(name, getattr(self, name), 1)

    def merged_recipe(self) -> SegmentationRecipe:
        return merge_recipe(RECIPES[self.recipe], self)

    @property
    def model_name(self) -> str:
        return f"{self.head}{'_' if self.head[-1].isdigit() else ''}{self.depth}"


def datasets(p: Params) -> tuple[ADE20K, ADE20K, tuple[str, ...]]:
    """Train set (augmented crops), validation set (full images) and class names. Both are checked
    here, before training (:meth:`ADE20K.check`): every mask's header, and the validation masks'
    labels, which would otherwise first be read after an epoch of training."""
    r = p.merged_recipe()
    root = p.data_dir or make_demo_ade20k(workbook_path(p.demo_dir), num_train=p.demo_train, num_val=p.demo_val)
    transform = TrainTransform(r.crop, r.scale, r.rotate)
    train = ADE20K(root, "training", transform, limit=p.train_subset or None)
    val = ADE20K(root, "validation", limit=p.val_subset or None)
    train.check(labels=False)
    val.check(labels=True)
    return train, val, train.classes


def train_config(p: Params) -> TrainConfig:
    """The TrainConfig of an experiment: its recipe, with the values its parameters set."""
    scale = p.merged_recipe().head_lr_scale
    return p.train_config(
        f"{p.model_name}-os{p.output_stride}-{p.recipe}-s{p.seed}",
        lr_multipliers={prefix: scale for prefix in NEW_MODULES} if scale != 1 else {},
        sync_bn=p.sync_bn and torch.cuda.is_available(),
    )


def task_for(p: Params, num_classes: int) -> SegmentationTask:
    """The task with the recipe's loss weight and test protocol."""
    r = p.merged_recipe()
    scales, flip = (MULTI_SCALES, True) if p.multi_scale else ((1.0,), False)
    return SegmentationTask(num_classes, r.aux_weight, r.test_crop, r.base_size, scales, flip)


def build_model(p: Params, num_classes: int) -> nn.Module:
    """The registered model of ``p`` (``model_args`` recorded, so checkpoints rebuild it); with ``weights``
    the run loads the whole model, so no backbone weights are read."""
    weights = "" if p.weights else resolve_backbone_weights(p.backbone_weights, p.backbone, p.depth, p.runs_dir)
    extra = {"backbone_weights": weights} if weights else {}
    return build(p.model_name, num_classes=num_classes, output_stride=p.output_stride, backbone=p.backbone, **extra)


def run(p: Params) -> FitResult:
    """Build data, model and recipe from ``p`` and train (in this process, or this torchrun rank)."""
    if not p.weights:  # may train the backbone: before seeding
        p = dataclasses.replace(
            p, backbone_weights=resolve_backbone_weights(p.backbone_weights, p.backbone, p.depth, p.runs_dir)
        )
    check_run_dir(train_config(p))  # before the data is read
    train, val, classes = datasets(p)
    seed_everything(p.seed)
    return fit(p.load_weights(build_model(p, len(classes))), task_for(p, len(classes)), train, val, train_config(p))


def evaluate_dataset(
    model: nn.Module, dataset: Dataset, task: SegmentationTask, device: torch.device | str = "cpu"
) -> tuple[dict[str, float], torch.Tensor]:
    """Metrics (with ``num_skipped``) and confusion matrix of ``model`` on ``dataset`` (e.g. an
    untrained model, or a finished run's best checkpoint) with the task's test protocol."""
    model.to(device).eval()
    loader = DataLoader(dataset, batch_size=8, collate_fn=collate)
    confusion, skipped = task.confusion(model, loader, torch.device(device))
    s = scores(confusion)
    metrics = {"miou": s["miou"], "pixel_acc": s["pixel_acc"], "mean_acc": s["mean_acc"], "num_skipped": float(skipped)}
    return metrics, confusion


@torch.no_grad()
def segmentation_sample(dataset: ADE20K, index: int, models: dict[str, nn.Module], task: SegmentationTask) -> dict:
    """One validation image for :func:`pyconv_core.plots.show_segmentation`: its ``name`` (file),
    the image (HWC uint8), its ground truth and each model's prediction (training-id masks); for an
    image or mask that cannot be decoded ``image`` is None, so the sample keeps its place."""
    file_name = dataset.samples[index][0].name
    item = dataset[index]
    if item is None:
        return {"name": file_name, "image": None, "truth": None, "preds": {}}
    image, mask = item
    preds = {}
    for name, model in models.items():
        model.eval()
        preds[name] = predict(model, image, task.num_classes, task.crop, task.base_size, task.scales, task.flip).argmax(
            0
        )
    return {"name": file_name, "image": denormalize(image), "truth": mask, "preds": preds}


def head_to_head(run_dirs: dict[str, str | Path], output_stride: int = 8) -> list[dict]:
    """Per head: the best validation mIoU / pixel accuracy of its run, beside S-Table 6 (ADE20K,
    ResNet-50) at ``output_stride``, with our params / GFLOPs of the 50-layer model at 473x473."""
    from pyconv_core.engine.logging import read_metrics

    rows = []
    for head, run_dir in run_dirs.items():
        best = max(read_metrics(run_dir, "eval"), key=lambda r: r["miou"])
        name = Params(head=head, depth=50).model_name
        paper = PAPER[name].metrics_at(output_stride)
        [cost] = [r for r in profile_rows([name]) if r["output_stride"] == output_stride]
        rows.append(
            {
                "head": head,
                "mIoU": best["miou"],
                "pixel acc": best["pixel_acc"],
                "paper mIoU": paper["miou"],
                "paper pixel acc": paper["pixel_acc"],
                "params-50 (M)": cost["params"] / 1e6,
                "paper params (M)": cost["paper_params"] / 1e6,
                "GFLOPs-50": cost["gflops"],
                "paper GFLOPs": cost["paper_gflops"],
            }
        )
    return rows
