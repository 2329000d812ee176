"""Classification metrics as pure functions over a confusion matrix (rows = true class, cols = predicted)."""
from __future__ import annotations

import torch
from torch import Tensor


def confusion_matrix(preds: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """Count (true, predicted) pairs into a (C, C) int64 matrix; row = true class, column = prediction."""
    if preds.shape != targets.shape or preds.dim() != 1:
        raise ValueError(f"preds and targets must be 1-D of equal length, got {tuple(preds.shape)} "
                         f"and {tuple(targets.shape)}")
    preds, targets = preds.long(), targets.long()
    if preds.numel() and (min(preds.min(), targets.min()) < 0 or max(preds.max(), targets.max()) >= num_classes):
        raise ValueError(f"class indices must lie in [0, {num_classes}), got preds in "
                         f"[{preds.min()}, {preds.max()}] and targets in [{targets.min()}, {targets.max()}]")
    # One bincount over flat indices true*C + pred counts every cell at once.
    flat = targets * num_classes + preds
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(cm: Tensor) -> Tensor:
    """Recall of each class: diagonal / row sum, as float64 (C,); nan for a class with no samples."""
    cm = cm.double()
    return cm.diagonal() / cm.sum(dim=1)  # 0/0 -> nan marks "not measured", unlike a real 0% class


def accuracy(cm: Tensor) -> float:
    """Fraction of all samples on the diagonal; nan for an empty matrix."""
    total = cm.sum().item()
    return cm.diagonal().sum().item() / total if total else float("nan")
