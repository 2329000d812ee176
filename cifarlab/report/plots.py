"""Figures of runs: training curves, confusion matrix, image grids and run comparison, saved as PNG.

Figures are built as bare `matplotlib.figure.Figure` objects, never through pyplot: pyplot keeps every
figure in a global registry (a leak unless closed) and may pick a GUI backend, while a bare Figure is
rendered by Agg when saved as PNG and freed with its last reference, so there is nothing to close.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from cifarlab.io import atomic_write

Row = Mapping[str, float | None]

SPLITS = ("train", "val", "test")
MAX_MARKED_POINTS = 30  # above this, markers clutter the line; below, they show lone points (e.g. one test eval)
MAX_ANNOTATED_CLASSES = 20  # cell numbers are unreadable beyond this (e.g. CIFAR-100); colours still are
# Largest confusion-plot side in inches: at 0.55 inch a class, CIFAR-100's would be a 6,000-pixel image taking
# 10 s to draw; beyond MAX_ANNOTATED_CLASSES the cells shrink and so do the tick labels.
MAX_CONFUSION_SIDE = 14.0


def plot_curves(rows: Sequence[Row], path: str | Path, *, title: str | None = None) -> Path:
    """Loss and accuracy vs epoch for each split present in metrics rows; accuracy vs epsilon too if logged."""
    has_epsilon = any(row.get("epsilon") is not None for row in rows)
    fig = Figure(figsize=(15 if has_epsilon else 10, 4), layout="constrained")
    axes = fig.subplots(1, 3 if has_epsilon else 2)
    for i, split in enumerate(SPLITS):
        style = {"label": split, "color": f"C{i}"}
        _line(axes[0], rows, "epoch", f"{split}_loss", **style)
        _line(axes[1], rows, "epoch", f"{split}_acc", scale=100, **style)
        if has_epsilon:
            _line(axes[2], rows, "epsilon", f"{split}_acc", scale=100, **style)
    _finish(axes[0], "epoch", "loss")
    _finish(axes[1], "epoch", "accuracy (%)")
    if has_epsilon:
        _finish(axes[2], "privacy budget ε", "accuracy (%)")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_confusion(cm: Tensor, classes: Sequence[str], path: str | Path, *, normalize: bool = True) -> Path:
    """Heatmap of a confusion matrix (rows = true class), as row percentages or raw counts."""
    cm = torch.as_tensor(cm)
    n = len(classes)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {tuple(cm.shape)} does not match {n} classes")
    values = cm.double()
    if normalize:
        values = 100 * values / values.sum(dim=1, keepdim=True).clamp_min(1)
    side = min(max(4.0, 0.55 * n + 2), MAX_CONFUSION_SIDE)
    fig = Figure(figsize=(side + 1, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values.numpy(), cmap="Blues", vmin=0, vmax=100 if normalize else None)
    fig.colorbar(image, ax=ax, shrink=0.8, label="% of true class" if normalize else "count")
    if n <= MAX_ANNOTATED_CLASSES:
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
    else:
        size = max(4.0, 0.6 * 72 * (side - 3) / n)  # points: about 0.6 of a cell
        ax.set_xticks(range(n), classes, rotation=90, fontsize=size)
        ax.set_yticks(range(n), classes, fontsize=size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (row %)" if normalize else "Confusion matrix (counts)")
    if n <= MAX_ANNOTATED_CLASSES:
        dark = values.max().item() / 2  # white text on dark cells, black on light ones
        for t in range(n):
            for p in range(n):
                v = values[t, p].item()
                ax.text(p, t, f"{v:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if v > dark else "black")
    return _save(fig, path)


def plot_image_grid(images: Tensor, labels: Tensor | Sequence[int], classes: Sequence[str], path: str | Path,
                    *, ncol: int = 8, title: str | None = None) -> Path:
    """Grid of uint8 images (N, 3, H, W), each titled with its class name."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3 or len(images) == 0:
        raise ValueError(f"expected a non-empty uint8 batch (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    labels = torch.as_tensor(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"{len(images)} images but labels of shape {tuple(labels.shape)}")
    ncol = min(ncol, len(images))
    nrow = math.ceil(len(images) / ncol)
    fig = Figure(figsize=(1.3 * ncol, 1.45 * nrow + (0.4 if title else 0)), layout="constrained")
    for ax, i in zip(fig.subplots(nrow, ncol, squeeze=False).flat, range(nrow * ncol)):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")  # (H, W, 3)
            ax.set_title(classes[int(labels[i])], fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_compare(runs: Mapping[str, Sequence[Row]], path: str | Path, *, metric: str = "test_acc") -> Path:
    """Overlay one accuracy curve (`metric`) and its matching loss curve per run."""
    if metric not in {f"{s}_acc" for s in SPLITS}:
        raise ValueError(f"metric must be one of train_acc, val_acc, test_acc, got {metric!r}")
    loss = metric.replace("_acc", "_loss")
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    for i, (name, rows) in enumerate(runs.items()):
        # 10 colours, then the next line style, so up to 40 runs stay distinguishable
        style = {"label": name, "color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[i // 10 % 4]}
        _line(acc_ax, rows, "epoch", metric, scale=100, **style)
        _line(loss_ax, rows, "epoch", loss, **style)
    _finish(acc_ax, "epoch", f"{metric.replace('_acc', '')} accuracy (%)")
    _finish(loss_ax, "epoch", f"{loss.replace('_loss', '')} loss")
    return _save(fig, path)


def _line(ax: Axes, rows: Sequence[Row], x: str, y: str, *, scale: float = 1.0, **style: str) -> None:
    """Plot y against x over the rows where both were measured; nothing if none were."""
    points = [(row[x], row[y] * scale) for row in rows if row.get(x) is not None and row.get(y) is not None]
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(points) <= MAX_MARKED_POINTS else None, markersize=3, **style)


def _finish(ax: Axes, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)


def _save(fig: Figure, path: str | Path) -> Path:
    # format is explicit because atomic_write's temporary file ends in .tmp
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
