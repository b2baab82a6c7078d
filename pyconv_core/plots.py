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
from matplotlib.patches import Rectangle

from pyconv_core.engine.logging import read_metrics
from pyconv_core.layers.pyconv import PyConv

__all__ = ["plot_params_vs_flops", "draw_pyconv_pyramid", "plot_curves", "plot_confusion", "show_misclassified"]

_FAMILY_ORDER = ("resnet", "pyconvresnet", "pyconvhgresnet")


def _family(name: str) -> str:
    return name.rstrip("0123456789_")


def plot_params_vs_flops(rows: Sequence[Mapping], size: int = 224) -> plt.Axes:
    """Params vs GFLOPs at ``size`` of the profile rows, one colour per family (paper Fig. 5 style)."""
    df = pd.DataFrame([r for r in rows if r["input"] == size])
    df["family"] = df["model"].map(_family)
    df["params (M)"] = df["params"] / 1e6
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.scatterplot(data=df, x="gflops", y="params (M)", hue="family", style="family", s=80, ax=ax,
                    hue_order=[f for f in _FAMILY_ORDER if f in set(df["family"])] or None)
    for _, r in df.iterrows():
        ax.annotate(r["model"].replace(r["family"], ""), (r["gflops"], r["params (M)"]), fontsize=8,
                    xytext=(4, 2), textcoords="offset points")
    ax.set(xlabel=f"GFLOPs at {size}x{size}", title="Parameters vs computation")
    return ax


def draw_pyconv_pyramid(layer: PyConv, title: str | None = None) -> plt.Axes:
    """The kernel pyramid of a PyConv: per level its spatial kernel, groups and output channels."""
    levels = list(layer.levels)
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
        ax.text(i * (biggest + 2) + biggest / 2, -1.2, f"{kernel}, G={conv.groups}\n{conv.in_channels}->{conv.out_channels} ch",
                ha="center", va="top", fontsize=9)
    ax.set_xlim(-1, len(levels) * (biggest + 2))
    ax.set_ylim(-4, biggest + 1)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title or f"PyConv{len(levels)}: kernels grow, groups grow with them")
    return ax


def _rows(run: str | os.PathLike | Sequence[Mapping]) -> list[Mapping]:
    return read_metrics(run) if isinstance(run, (str, os.PathLike)) else list(run)


def plot_curves(runs: Mapping[str, str | os.PathLike | Sequence[Mapping]],
                panels: Sequence[tuple[str, str]] = (("train", "train_loss"), ("eval", "top1_err")),
                ax_row: Sequence[plt.Axes] | None = None) -> Sequence[plt.Axes]:
    """Convergence curves of several runs side by side: one panel per (row kind, metric)."""
    frames = []
    for label, run in runs.items():
        for row in _rows(run):
            frames.append({**row, "run": label})
    df = pd.DataFrame(frames)
    if ax_row is None:
        _, ax_row = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
        ax_row = ax_row[0]
    for ax, (kind, metric) in zip(ax_row, panels):
        part = df[df["kind"] == kind].dropna(subset=[metric]) if metric in df else df.iloc[:0]
        if len(part):
            sns.lineplot(data=part, x="epoch", y=metric, hue="run", marker="o", ax=ax)
        ax.set_title(f"{kind}: {metric}")
    return ax_row


def plot_confusion(predicted: torch.Tensor, truth: torch.Tensor, classes: Sequence[str]) -> plt.Axes:
    """Row-normalised confusion matrix (rows: true class)."""
    n = len(classes)
    counts = torch.bincount(truth * n + predicted, minlength=n * n).reshape(n, n).double()
    rates = (counts / counts.sum(1, keepdim=True).clamp(min=1)).numpy()
    fig, ax = plt.subplots(figsize=(0.6 * n + 2, 0.6 * n + 1))
    sns.heatmap(rates, annot=True, fmt=".2f", cmap="Blues", xticklabels=classes, yticklabels=classes, ax=ax,
                cbar=False, annot_kws={"fontsize": 7})
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (row-normalised)")
    return ax


def show_misclassified(dataset, predicted: torch.Tensor, truth: torch.Tensor, classes: Sequence[str],
                       count: int = 12) -> plt.Figure:
    """A gallery of misclassified images with true and predicted class."""
    wrong = torch.nonzero(predicted != truth).flatten()[:count].tolist()
    cols = min(6, max(1, len(wrong)))
    fig, axes = plt.subplots((len(wrong) + cols - 1) // cols or 1, cols, figsize=(2 * cols, 2.3 * ((len(wrong) + cols - 1) // cols or 1)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        image = dataset[i][0]
        image = (image - image.min()) / (image.max() - image.min() + 1e-8)
        ax.imshow(np.asarray(image.permute(1, 2, 0)))
        ax.set_title(f"true {classes[truth[i]]}\npred {classes[predicted[i]]}", fontsize=8)
    fig.suptitle("Misclassified validation images")
    return fig
