"""Continual-learning metrics as pure functions over an accuracy matrix.

`acc` is (S, C): the accuracy on test class c after step s (per-class recall, as
`cifarlab.metrics.per_class_accuracy` gives); `seen` is the (S, C) bool mask of
classes learned by step s. Test classes are balanced in CIFAR, so the mean of per-class
accuracies equals the accuracy over examples.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cifarlab import metrics


def seen_accuracy(acc: Tensor, seen: Tensor) -> Tensor:
    """Mean accuracy over the classes learned by each step: (S,)."""
    return torch.stack([row[mask].mean() for row, mask in zip(acc.double(), seen)])


def average_incremental_accuracy(acc: Tensor, seen: Tensor) -> float:
    """Mean over steps of the accuracy on the classes seen so far (Rebuffi et al., iCaRL, CVPR 2017)."""
    return seen_accuracy(acc, seen).mean().item()


def forgetting(acc: Tensor, seen: Tensor) -> float:
    """Average forgetting (Chaudhry et al., RWalk, ECCV 2018): for each class learned before the
    last step, its best accuracy at an earlier step minus its accuracy after the last step;
    nan when there is no earlier step."""
    if acc.shape[0] < 2:
        return float("nan")
    earlier = seen[-2]  # classes already learned before the last step
    if not earlier.any():
        return float("nan")
    best = acc[:-1].double().masked_fill(~seen[:-1], float("-inf")).max(dim=0).values
    return (best - acc[-1].double())[earlier].mean().item()


def auroc(scores: Tensor, positive: Tensor) -> float:
    """AUROC of `scores` (N,) for detecting the `positive` (N,) bool rows (cifarlab.metrics.auroc); nan when
    either group is empty, as after the last step, when no class is left unseen."""
    scores, positive = scores.detach().cpu(), positive.cpu().bool()
    if positive.all() or not positive.any():
        return float("nan")
    return metrics.auroc(scores[positive], scores[~positive])


def fpr95(scores: Tensor, positive: Tensor) -> float:
    """False-positive rate at 95% true-positive rate of `scores` (N,) for detecting the `positive` (N,) bool rows
    (cifarlab.metrics.fpr_at_tpr); nan when either group is empty."""
    scores, positive = scores.detach().cpu(), positive.cpu().bool()
    if positive.all() or not positive.any():
        return float("nan")
    return metrics.fpr_at_tpr(scores[positive], scores[~positive], tpr=0.95)
