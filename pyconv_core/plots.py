"""Figures of the notebooks: model profile, kernel pyramids, convergence curves, errors.

Task-specific views (boxes, masks, clips) live further down, one function each.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from pyconv_core.engine.logging import read_metrics
from pyconv_core.layers.pyconv import PyConv

__all__ = [
    "plot_params_vs_flops",
    "draw_pyconv_pyramid",
    "metric_label",
    "plot_curves",
    "plot_confusion",
    "gallery_indices",
    "show_misclassified",
]

_FAMILY_ORDER = ("resnet", "pyconvresnet", "pyconvhgresnet")


def _family(name: str) -> str:
    return name.rstrip("0123456789_")


def plot_params_vs_flops(rows: Sequence[Mapping], size: int = 224) -> plt.Axes:
    """Params vs GFLOPs at ``size`` of the profile rows, one colour per family (paper Fig. 5 style)."""
    df = pd.DataFrame([r for r in rows if r["input"][-1] == size])
    df["family"] = df["model"].map(_family)
    df["params (M)"] = df["params"] / 1e6
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.scatterplot(
        data=df,
        x="gflops",
        y="params (M)",
        hue="family",
        style="family",
        s=80,
        ax=ax,
        hue_order=[f for f in _FAMILY_ORDER if f in set(df["family"])] or None,
    )
    for _, r in df.iterrows():
        ax.annotate(
            r["model"].replace(r["family"], ""),
            (r["gflops"], r["params (M)"]),
            fontsize=8,
            xytext=(4, 2),
            textcoords="offset points",
        )
    ax.set(xlabel=f"GFLOPs at {size}x{size}", title="Parameters vs computation")
    return ax


def draw_pyconv_pyramid(layer: PyConv, title: str | None = None) -> plt.Axes:
    """The kernel pyramid of a PyConv: per level its spatial kernel, groups and output channels."""
    levels = list(layer.convs)
    biggest = max(c.kernel_size[-1] for c in levels)
    fig, ax = plt.subplots(figsize=(2.2 * len(levels), 2.8))
    palette = sns.color_palette("viridis", len(levels))
    for i, (conv, colour) in enumerate(zip(levels, palette)):
        k = conv.kernel_size[-1]
        x0 = i * (biggest + 2) + (biggest - k) / 2
        for r in range(k):
            for c in range(k):
                ax.add_patch(Rectangle((x0 + c, (biggest - k) / 2 + r), 1, 1, facecolor=colour, edgecolor="white"))
        kernel = "x".join(map(str, conv.kernel_size))
        label = f"{kernel}, G={conv.groups}\n{conv.in_channels}->{conv.out_channels} ch"
        ax.text(i * (biggest + 2) + biggest / 2, -1.2, label, ha="center", va="top", fontsize=9)
    ax.set_xlim(-1, len(levels) * (biggest + 2))
    ax.set_ylim(-4, biggest + 1)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title or f"PyConv{len(levels)}: kernels grow, groups grow with them")
    return ax


def _rows(run: str | os.PathLike | Sequence[Mapping]) -> Sequence[Mapping]:
    return read_metrics(run) if isinstance(run, (str, os.PathLike)) else list(run)


# What the logged keys measure, with units (training rows' "train_" prefix dropped first); a key
# not listed is shown with spaces for underscores.
_QUANTITIES = {
    "loss": "loss",
    "val_loss": "loss",
    "cls": "classification loss",
    "loc": "box regression loss",
    "main_loss": "main-head loss",
    "aux_loss": "auxiliary-head loss",
    "top1": "top-1 accuracy (%)",
    "top5": "top-5 accuracy (%)",
    "top1_err": "top-1 error (%)",
    "top5_err": "top-5 error (%)",
    "AP": "AP (%)",
    "AP50": "AP50 (%)",
    "AP75": "AP75 (%)",
    "miou": "mIoU (%)",
    "pixel_acc": "pixel accuracy (%)",
    "mean_acc": "mean class accuracy (%)",
}


def metric_label(kind: str, metric: str) -> tuple[str, str]:
    """Panel title and y label of a (row kind, metric) pair, e.g. ("eval", "top1_err") ->
    ("validation top-1 error (%)", "top-1 error (%)"), so figures name quantities, not log keys."""
    key = metric.removeprefix("train_") if kind in ("train", "step") else metric
    quantity = _QUANTITIES.get(key, key.replace("_", " "))
    return f"{'training' if kind in ('train', 'step') else 'validation'} {quantity}", quantity


def plot_curves(
    runs: Mapping[str, str | os.PathLike | Sequence[Mapping]],
    panels: Sequence[tuple[str, str]] = (("train", "train_loss"), ("eval", "top1_err")),
    ax_row: Sequence[plt.Axes] | None = None,
) -> Sequence[plt.Axes]:
    """Convergence curves of several runs side by side: one panel per (row kind, metric).

    A ``"train"`` panel draws the run's ``"step"`` rows (every few optimizer steps, at fractional
    epochs) as its line where it has them, with the per-epoch means as markers, so a run of a few
    epochs still shows how the loss fell; other panels join their per-epoch rows."""
    frames = []
    for label, run in runs.items():
        for row in _rows(run):
            frames.append({**row, "run": label})
    df = pd.DataFrame(frames)
    colours = dict(zip(runs, sns.color_palette(n_colors=len(runs))))  # one colour per run in every panel
    if ax_row is None:
        ax_row = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)[1][0]
    for ax, (kind, metric) in zip(ax_row, panels):
        part = df[df["kind"] == kind].dropna(subset=[metric]) if metric in df else df.iloc[:0]
        line = part
        if kind == "train" and len(part):
            steps = df[df["kind"] == "step"].dropna(subset=[metric])
            line = pd.concat([steps, part[~part["run"].isin(set(steps["run"]))]])
        if len(part):
            order = [run for run in runs if run in set(part["run"])]
            sns.lineplot(
                data=line, x="epoch", y=metric, hue="run", hue_order=order, palette=colours, ax=ax, errorbar=None
            )
            sns.scatterplot(
                data=part,
                x="epoch",
                y=metric,
                hue="run",
                hue_order=order,
                palette=colours,
                ax=ax,
                legend=False,
                zorder=3,
            )
        title, ylabel = metric_label(kind, metric)
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return ax_row


def plot_confusion(
    predicted: torch.Tensor, truth: torch.Tensor, classes: Sequence[str], title: str | None = None
) -> plt.Axes:
    """Row-normalised confusion matrix (rows: true class); ``title`` names the model (e.g.
    "PyConvResNet-18") so that matrices of several models can be told apart. Entries of -1 (items
    that could not be read, as ``tasks.classification.predict`` marks them) are left out."""
    readable = (truth >= 0) & (predicted >= 0)
    predicted, truth = predicted[readable], truth[readable]
    n = len(classes)
    counts = torch.bincount(truth * n + predicted, minlength=n * n).reshape(n, n).double()
    rates = (counts / counts.sum(1, keepdim=True).clamp(min=1)).numpy()
    fig, ax = plt.subplots(figsize=(0.6 * n + 2, 0.6 * n + 1))
    sns.heatmap(
        rates,
        annot=True,
        fmt=".2f",
        cmap="Blues",
        xticklabels=classes,
        yticklabels=classes,
        ax=ax,
        cbar=False,
        annot_kws={"fontsize": 7},
    )
    ax.set(
        xlabel="predicted",
        ylabel="true",
        title=f"{title}: confusion matrix (row-normalised)" if title else "Confusion matrix (row-normalised)",
    )
    return ax


def gallery_indices(available: int, count: int) -> list[int]:
    """``min(count, available)`` indices spread evenly over ``range(available)`` (all of them when
    ``count`` covers the data): the items a gallery draws, whatever the size of its data set."""
    shown = min(count, available)
    return [round(i * (available - 1) / max(shown - 1, 1)) for i in range(shown)]


def show_misclassified(
    dataset, predicted: torch.Tensor, truth: torch.Tensor, classes: Sequence[str], count: int = 12
) -> plt.Figure:
    """A gallery of misclassified images with true and predicted class; ``predicted`` and ``truth``
    are indexed by dataset index (``tasks.classification.predict``), -1 for unreadable items."""
    wrong = torch.nonzero((predicted != truth) & (truth >= 0)).flatten()[:count].tolist()
    cols = min(6, max(1, len(wrong)))
    rows = (len(wrong) + cols - 1) // cols or 1
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        image = dataset[i][0]
        image = (image - image.min()) / (image.max() - image.min() + 1e-8)
        ax.imshow(np.asarray(image.permute(1, 2, 0)))
        ax.set_title(f"true {classes[int(truth[i])]}\npred {classes[int(predicted[i])]}", fontsize=8)
    fig.suptitle("Misclassified validation images")
    return fig


def _draw_boxes(
    ax: plt.Axes,
    image: np.ndarray,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    scores: torch.Tensor | None = None,
    title: str = "",
) -> None:
    """One image with its boxes (pixel xyxy), each labelled with its class (and score)."""
    ax.imshow(image)
    palette = sns.color_palette("tab10", len(class_names))
    for k, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist())):
        x0, y0, x1, y1 = box
        colour = palette[label % len(palette)]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.5))
        text = class_names[label] + ("" if scores is None else f" {float(scores[k]):.2f}")
        ax.text(x0, y0, text, fontsize=7, color="white", va="bottom", bbox={"facecolor": colour, "pad": 1, "lw": 0})
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def show_detections(samples: Sequence[Mapping], class_names: Sequence[str], pairs_per_row: int = 3) -> plt.Figure:
    """Ground truth beside predictions for each sample (``image`` HWC uint8, ``truth`` and ``pred``
    with pixel ``boxes`` and ``labels``, ``pred`` also ``scores``; ``name``, if given, titles the
    pair), as ``tasks.detection.predict`` makes them; a sample whose image could not be decoded
    (``image`` None) keeps its place, marked as skipped."""
    rows = (len(samples) + pairs_per_row - 1) // pairs_per_row or 1
    fig, axes = plt.subplots(rows, 2 * pairs_per_row, figsize=(4.4 * pairs_per_row, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, sample in enumerate(samples):
        left, right = axes.flat[2 * k], axes.flat[2 * k + 1]
        name = f"{sample['name']}: " if sample.get("name") else ""
        if sample["image"] is None:
            left.set_title(f"{name}unreadable, skipped", fontsize=9)
            continue
        _draw_boxes(
            left,
            sample["image"],
            sample["truth"]["boxes"],
            sample["truth"]["labels"],
            class_names,
            title=f"{name}ground truth",
        )
        _draw_boxes(
            right,
            sample["image"],
            sample["pred"]["boxes"],
            sample["pred"]["labels"],
            class_names,
            sample["pred"]["scores"],
            title="predicted",
        )
    fig.tight_layout()
    return fig


def browse_detections(predict_one, count: int, class_names: Sequence[str], threshold: float = 0.3) -> None:
    """An ipywidgets browser: slide over images and score thresholds; ``predict_one(index, threshold)``
    returns one sample for :func:`show_detections`."""
    from ipywidgets import FloatSlider, IntSlider, interact

    def view(index: int, score_threshold: float) -> None:
        show_detections([predict_one(index, score_threshold)], class_names, pairs_per_row=1)
        plt.show()

    interact(
        view,
        index=IntSlider(value=0, min=0, max=count - 1, description="image"),
        score_threshold=FloatSlider(value=threshold, min=0.05, max=0.95, step=0.05, description="score"),
    )


__all__ += ["show_detections", "browse_detections"]


def _class_legend(
    masks: Sequence[torch.Tensor | np.ndarray], palette: np.ndarray, classes: Sequence[str] | None
) -> list[Patch]:
    """A colour patch per class present in ``masks`` (training ids; ``classes`` names them, else
    "class <id>"), and a black "ignored" patch if any pixel is ignored."""
    from pyconv_core.data.ade20k import IGNORE_INDEX

    present = np.unique(
        np.concatenate([np.asarray(m.cpu() if isinstance(m, torch.Tensor) else m).ravel() for m in masks])
    )
    patches = [
        Patch(
            facecolor=palette[i] / 255 if i < len(palette) else "black",
            edgecolor="grey",
            label=classes[i] if classes is not None and i < len(classes) else f"class {i}",
        )
        for i in present.tolist()
        if i != IGNORE_INDEX
    ]
    if IGNORE_INDEX in present:
        patches.append(Patch(facecolor="black", edgecolor="grey", label="ignored"))
    return patches


def show_segmentation(
    samples: Sequence[Mapping], palette: np.ndarray, classes: Sequence[str] | None = None
) -> plt.Figure:
    """One row per sample: image | ground truth | each model's prediction, masks coloured with
    ``palette`` (training ids; ignored pixels black), and below them a legend of the classes present
    (named by ``classes``, e.g. the data set's ``classes``). A sample has ``image`` (HWC uint8),
    ``truth`` and ``preds`` (model name -> mask), as ``tasks.segmentation.segmentation_sample`` makes them;
    a sample that could not be decoded (``image`` None) keeps its row, marked as skipped, under its ``name``."""
    from pyconv_core.data.ade20k import colorize

    masks = [m for s in samples if s["image"] is not None for m in (s["truth"], *s["preds"].values())]
    legend = _class_legend(masks, palette, classes) if masks else []
    cols = 2 + max(len(s["preds"]) for s in samples)
    columns = min(len(legend), max(3, cols * 2)) or 1
    legend_height = 0.25 * ((len(legend) + columns - 1) // columns) + 0.2  # inches: legend rows + margin
    fig, axes = plt.subplots(
        len(samples), cols, figsize=(2.3 * cols, 2.3 * len(samples) + legend_height), squeeze=False
    )
    for row, sample in zip(axes, samples):
        for ax in row:
            ax.axis("off")
        if sample["image"] is None:
            row[0].set_title(f"{sample.get('name', '')}: unreadable, skipped", fontsize=9)
            continue
        panels = [("image", sample["image"]), ("ground truth", colorize(sample["truth"], palette))]
        panels += [(name, colorize(mask, palette)) for name, mask in sample["preds"].items()]
        for ax, (title, picture) in zip(row, panels):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=9)
    fig.legend(handles=legend, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_height / fig.get_figheight(), 1, 1))
    return fig


def browse_segmentation(
    sample_one, count: int, models: Sequence[str], palette: np.ndarray, classes: Sequence[str] | None = None
) -> None:
    """An ipywidgets browser over validation images and models; ``sample_one(index, model)``
    returns one sample for :func:`show_segmentation`."""
    from ipywidgets import Dropdown, IntSlider, interact

    def view(index: int, model: str) -> None:
        show_segmentation([sample_one(index, model)], palette, classes)
        plt.show()

    interact(
        view,
        index=IntSlider(value=0, min=0, max=count - 1, description="image"),
        model=Dropdown(options=list(models), description="head"),
    )


__all__ += ["show_segmentation", "browse_segmentation"]
