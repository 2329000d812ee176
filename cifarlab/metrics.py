"""Metrics every layer shares, as pure tensor functions: the confusion matrix and what it gives, the AUROC and
the false-positive rate at a fixed true-positive rate.

A leaf module (torch and cifarlab.errors only), so training, privacy, uncertainty, continual learning and the
reports all score with the same code.
"""
from __future__ import annotations

import math

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


def fpr_at_tpr(positive: Tensor, negative: Tensor, *, tpr: float = 0.95) -> float:
    """False-positive rate at `tpr` true-positive rate (FPR95 at the default, the second number of the novelty and
    out-of-distribution literature beside the AUROC) of a score that should rank `positive` above `negative`.

    Flagging every score >= t, the threshold t is the highest that flags at least a `tpr` fraction of the
    positives, i.e. the ceil(tpr n+)-th largest positive score; the result is the fraction of negatives >= t.
    Negatives tied with t count as flagged (a tie cannot be told apart, so it is not given the benefit of the
    doubt), and positives tied with t may push the true-positive rate above `tpr`, as on the ROC curve's step.
    """
    if positive.dim() != 1 or negative.dim() != 1 or len(positive) == 0 or len(negative) == 0:
        raise ConfigError(f"the FPR at a TPR needs two non-empty 1-D score tensors, got {tuple(positive.shape)} "
                          f"and {tuple(negative.shape)}")
    if not 0 < tpr <= 1:
        raise ConfigError(f"tpr must lie in (0, 1], got {tpr}")
    ordered = positive.detach().cpu().double().sort(descending=True).values
    needed = math.ceil(round(tpr * len(ordered), 9))  # round: 0.95 * 20 must give 19, not 19.000000000000004
    threshold = ordered[needed - 1]
    return (negative.detach().cpu().double() >= threshold).double().mean().item()
