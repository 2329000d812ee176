"""Metrics every layer shares, as pure tensor functions: the confusion matrix and what it gives, and the AUROC.

A leaf module (torch and cifarlab.errors only), so training, privacy, uncertainty, continual learning and the
reports all score with the same code.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cifarlab.errors import ConfigError


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


def auroc(positive: Tensor, negative: Tensor) -> float:
    """Area under the ROC curve of a score that should rank `positive` examples above `negative` ones (1-D
    scores of each): P(random positive > random negative) + P(tie) / 2.

    The Mann-Whitney rank formula (R+ - n+ (n+ + 1) / 2) / (n+ n-), with R+ the sum of the positives' ranks
    among all scores and tied scores sharing their average rank; O(n log n).
    """
    if positive.dim() != 1 or negative.dim() != 1 or len(positive) == 0 or len(negative) == 0:
        raise ConfigError(f"the AUROC needs two non-empty 1-D score tensors, got {tuple(positive.shape)} "
                          f"and {tuple(negative.shape)}")
    scores = torch.cat([positive.detach().cpu().double(), negative.detach().cpu().double()])
    # 1-based ranks averaged over ties, as scipy.stats.rankdata's default (computed here because importing
    # scipy.stats costs seconds); all in float64, where sums of half-integers this size are exact.
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    counts = counts.double()
    ranks = (counts.cumsum(0) - (counts - 1) / 2)[inverse]
    n_pos, n_neg = len(positive), len(negative)
    return (ranks[:n_pos].sum().item() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
