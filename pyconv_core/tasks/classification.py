"""Image classification: the step, top-1/top-5 evaluation, the paper's recipes, and one entry point.

``run(Params(...))`` is what both the notebook and ``python -m pyconv_core.run classification``
call, so a notebook run and a torchrun job with the same parameters are the same experiment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pyconv_core.data.classification import (
    DeviceAugment,
    EncodedBatch,
    FashionMNIST,
    collate_encoded,
    collate_skipping_bad,
    imagenet_datasets,
)
from pyconv_core.engine import distributed as dist
from pyconv_core.engine.logging import changed_parameters, read_config, read_metrics, workbook_path
from pyconv_core.engine.trainer import FitResult, TrainConfig, check_run_dir, fit, seed_everything
from pyconv_core.registry import build
from pyconv_core.tasks.base import Recipe, RunParams, at_least, between, check_model, merge_recipe, one_of

__all__ = [
    "ClassificationTask",
    "Params",
    "RECIPES",
    "run",
    "task_for",
    "datasets",
    "predict",
    "demo_backbone",
    "DEMO_BACKBONE",
    "resolve_backbone_weights",
    "ClassificationRecipe",
]


@dataclass(frozen=True)
class ClassificationRecipe(Recipe):
    cutmix_alpha: float = 0.0  # CutMix's Beta(alpha, alpha); 0: off


# docs/paper.md s.3. Milestones are fractions of the run's epochs (30/60/80 of 90), so a short run keeps the shape.
RECIPES: dict[str, ClassificationRecipe] = {
    "standard": ClassificationRecipe(
        lr=0.1,
        lr_reference_batch=256,
        batch_size=256,
        epochs=90,
        weight_decay=1e-4,
        schedule="multistep",
        milestone_fractions=(30 / 90, 60 / 90, 80 / 90),
    ),
    "augment": ClassificationRecipe(
        lr=0.4,
        lr_reference_batch=1024,
        batch_size=1024,
        epochs=300,
        weight_decay=1e-4,
        schedule="cosine",
        amp="bf16",
        cutmix_alpha=1.0,
    ),
    # Not the paper's: the CPU demo's few epochs on Fashion-MNIST. A multistep decay at 1/3 and 2/3 of
    # 3 epochs would cut the lr 10x after the first one, before the network has learned much.
    "demo": ClassificationRecipe(
        lr=0.05, lr_reference_batch=256, batch_size=64, epochs=3, weight_decay=5e-4, schedule="cosine"
    ),
}


class ClassificationTask:
    """Cross-entropy (optionally with CutMix); evaluation in top-1/top-5 accuracy and error. With
    ``device_augment`` the training batches hold encoded images, decoded and augmented on the device."""

    name = "classification"
    main_metric = "top1"

    def __init__(self, cutmix_alpha: float = 0.0, device_augment: DeviceAugment | None = None) -> None:
        self.cutmix_alpha, self.device_augment = cutmix_alpha, device_augment
        self.collate_fn = collate_encoded if device_augment else collate_skipping_bad

    def train_step(self, model: nn.Module, batch, device: torch.device) -> dict[str, torch.Tensor]:
        images, labels, skipped = batch
        if isinstance(images, EncodedBatch):
            assert self.device_augment is not None, "encoded images need the task's device_augment"
            images, labels, failed = self.device_augment(images, labels, device)
            skipped += failed
        skipped_t = torch.tensor(float(skipped))
        if len(labels) == 0:
            zero = torch.stack([p.sum() for p in model.parameters()]).sum() * 0.0
            return {"loss": zero, "num_skipped": skipped_t}
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if self.cutmix_alpha > 0:
            images, labels_b, lam = cutmix(images, labels, self.cutmix_alpha)
            logits = model(images)
            loss = lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, labels_b)
        else:
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
        return {"loss": loss, "num_skipped": skipped_t}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        totals = torch.zeros(5, dtype=torch.float64, device=device)  # correct1, correct5, loss, n, skipped
        for images, labels, skipped in loader:
            totals[4] += skipped
            if len(labels) == 0:
                continue
            images, labels = images.to(device), labels.to(device)
            logits = model(images).float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top == labels[:, None]
            totals[0] += hits[:, 0].sum()
            totals[1] += hits.any(dim=1).sum()
            totals[2] += F.cross_entropy(logits, labels, reduction="sum")
            totals[3] += len(labels)
        c1, c5, loss, n, skipped = dist.all_reduce_sum(totals).tolist()
        n = max(n, 1.0)
        return {
            "top1": 100 * c1 / n,
            "top5": 100 * c5 / n,
            "top1_err": 100 - 100 * c1 / n,
            "top5_err": 100 - 100 * c5 / n,
            "val_loss": loss / n,
            "num_samples": n,
            "num_skipped": skipped,
        }


def cutmix(images: torch.Tensor, labels: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix (Yun et al. 2019): paste a random box from a shuffled batch; lam = kept area fraction."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(images.shape[0], device=images.device)
    h, w = images.shape[-2:]
    cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
    cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    images = images.clone()
    images[..., y0:y1, x0:x1] = images[perm][..., y0:y1, x0:x1]
    return images, labels[perm], 1 - (y1 - y0) * (x1 - x0) / (h * w)


@dataclass
class Params(RunParams):
    """The classification experiment: the notebook's ``parameters`` cell and the launcher's flags."""

    arch: str = "pyconvresnet"  # resnet | pyconvresnet | pyconvhgresnet (or a full registered name)
    depth: int = 18  # 18, 34, 50, 101, 152
    data_dir: str = ""  # ImageNet-layout folder; empty: embedded Fashion-MNIST
    recipe: str = ""  # standard | augment (docs/paper.md s.3) | demo; empty: standard with data_dir, else demo
    batch_size: int | None = None  # global batch over all processes; None: the recipe's (256, 1024, demo 64)
    lr: float | None = None  # per the recipe's reference batch, scaled linearly; None: the recipe's
    crop: int = 224  # ImageNet train crop
    test_crop: int | None = None  # ImageNet test crop; None: as crop (320 for the paper's 320x320 test)
    image_size: int = 32  # Fashion-MNIST side (28x28 upsampled)
    train_subset: int = 16000  # Fashion-MNIST training images (0: all 60,000)
    val_subset: int = 2000  # Fashion-MNIST test images (0: all 10,000)
    augment: bool = False  # Fashion-MNIST: padded random crop and flip (slows the few-epoch demo); ImageNet: always
    # where ImageNet training JPEGs are decoded, cropped and flipped: "loader" (the DataLoader's CPU workers) or
    # "device" (the training GPU, torchvision.io.decode_jpeg): for CPUs too slow to feed the GPU (BENCHMARKS.md)
    decode_on: str = "loader"
    dropout: float = 0.0
    zero_init_residual: bool = False

    ARCHS = ("resnet", "pyconvresnet", "pyconvhgresnet")  # arch families, completed by depth

    def check(self) -> None:
        super().check()
        check_model("arch", self.arch, self.ARCHS, self.depth, "classification")
        one_of("recipe", self.recipe, ("", *RECIPES), " ('': standard with data_dir, else demo)")
        one_of("decode_on", self.decode_on, ("loader", "device"))
        if self.decode_on == "device" and not self.data_dir:
            raise ValueError(
                "decode_on 'device' decodes ImageNet JPEG files and needs data_dir; Fashion-MNIST is "
                "held decoded in memory: leave decode_on 'loader'"
            )
        at_least("crop", self.crop, 1)
        if self.test_crop is not None:
            at_least("test_crop", self.test_crop, 1, " (or None: as crop)")
        for name in ("train_subset", "val_subset"):
            at_least(name, getattr(self, name), 0, " (0: all)")
        at_least("image_size", self.image_size, 1)
        between("dropout", self.dropout, 0, 1)

    @property
    def recipe_name(self) -> str:
        return self.recipe or ("standard" if self.data_dir else "demo")

    def merged_recipe(self) -> ClassificationRecipe:
        return merge_recipe(RECIPES[self.recipe_name], self)

    @property
    def model_name(self) -> str:
        return self.arch if self.arch[-1].isdigit() else f"{self.arch}{self.depth}"


def datasets(p: Params) -> tuple[Dataset, Dataset, tuple[str, ...]]:
    """Train set, validation set and class names for the parameters."""
    if p.data_dir:
        train, val = imagenet_datasets(p.data_dir, p.crop, p.test_crop, p.decode_on == "device")
        return train, val, tuple(train.classes)
    return (
        FashionMNIST("train", p.image_size, p.train_subset or None, augment=p.augment),
        FashionMNIST("test", p.image_size, p.val_subset or None),
        FashionMNIST.classes,
    )


def train_config(p: Params) -> TrainConfig:
    """The TrainConfig of an experiment: its recipe, with the values its parameters set."""
    return p.train_config(f"{p.model_name}-{p.recipe_name}-s{p.seed}")


def run(p: Params) -> FitResult:
    """Build data, model and recipe from ``p`` and train (in this process, or this torchrun rank)."""
    check_run_dir(train_config(p))  # before the data is read
    train, val, classes = datasets(p)
    seed_everything(p.seed)
    model = build(p.model_name, num_classes=len(classes), dropout=p.dropout, zero_init_residual=p.zero_init_residual)
    return fit(p.load_weights(model), task_for(p), train, val, train_config(p))


def task_for(p: Params) -> ClassificationTask:
    """The task of ``p``: its recipe's CutMix, and the device-side decoding of ``decode_on``."""
    augment = DeviceAugment(p.crop) if p.decode_on == "device" else None
    return ClassificationTask(p.merged_recipe().cutmix_alpha, augment)


DEMO_BACKBONE = "fashion-mnist"  # backbone_weights value of detection and segmentation: demo_backbone()


def resolve_backbone_weights(value: str, family: str, depth: int, runs_dir: str = "runs") -> str:
    """A ``backbone_weights`` parameter as a path: :data:`DEMO_BACKBONE` becomes :func:`demo_backbone`'s
    checkpoint (trained first if needed), anything else is returned as given ("" trains from scratch)."""
    return str(demo_backbone(family, depth, runs_dir)) if value == DEMO_BACKBONE else value


def demo_backbone(family: str, depth: int, runs_dir: str = "runs") -> Path:
    """The demo's stand-in for an ImageNet-pretrained backbone (S-Sections 1 and 6 start detection and
    segmentation from one): ``best.pt`` of the classification notebook's default Fashion-MNIST run of
    ``family``/``depth``. A finished run with exactly those parameters is reused; otherwise it is
    trained now (a few minutes on a CPU) and kept under ``runs/``. A different experiment already under
    that name is left alone: the backbone then goes to ``<name>-backbone``. Runs that differ only in
    how they executed (``engine.logging.EXECUTION_FIELDS``) are the same backbone."""
    p = Params(arch=family, depth=depth, runs_dir=runs_dir, progress=False)  # as notebook 01
    wanted = dataclasses.asdict(train_config(p))
    name = wanted["run_name"]
    folders = [workbook_path(runs_dir) / candidate for candidate in (name, f"{name}-backbone")]
    run_dir = next(
        (
            d
            for d in folders
            if (recorded := read_config(d)) is None or not changed_parameters(recorded["train"], wanted)
        ),
        None,
    )
    if run_dir is None:
        raise ValueError(
            f"{folders[0]} and {folders[1]} hold other experiments than the Fashion-MNIST "
            f"backbone of {p.model_name}: rename one, or pass backbone_weights explicitly"
        )
    evaluated = read_metrics(run_dir, "eval") if (run_dir / "metrics.jsonl").is_file() else []
    if not any(row["epoch"] == wanted["epochs"] for row in evaluated):
        print(f"training the Fashion-MNIST backbone {p.model_name} into {run_dir} (once; later runs reuse it)")
        run(dataclasses.replace(p, run_name=run_dir.name, resume=True))
    return run_dir / "best.pt"


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true labels of the items of ``dataset``, position i for item i (for confusion
    matrices and error galleries). Both are -1 for an item that cannot be read, so a skipped item
    never shifts another; ``truth >= 0`` selects the readable ones."""
    model.eval()
    size = len(cast(Sized, dataset))  # torch's Dataset type does not declare __len__
    preds = torch.full((size,), -1, dtype=torch.long)
    labels = preds.clone()
    for start in range(0, size, batch_size):
        indices = range(start, min(start + batch_size, size))
        samples = [dataset[i] for i in indices]
        readable = [i for i, sample in zip(indices, samples) if sample is not None]
        if readable:
            images, y, _ = collate_skipping_bad(samples)
            preds[readable], labels[readable] = model(images).argmax(1).cpu(), y
    return preds, labels
