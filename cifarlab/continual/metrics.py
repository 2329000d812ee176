"""Continual-learning metrics as pure functions over an accuracy matrix.

`acc` is (S, C): the accuracy on test class c after step s (per-class recall, as
`cifarlab.report.metrics.per_class_accuracy` gives); `seen` is the (S, C) bool mask of
classes learned by step s. Test classes are balanced in CIFAR, so the mean of per-class
accuracies equals the accuracy over examples.
"""
from __future__ import annotations

import torch
from torch import Tensor


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
    """Area under the ROC curve of `scores` for detecting `positive` (bool) rows, via the
    Mann-Whitney rank statistic (ties count half); nan if either group is empty."""
    scores, positive = scores.detach().cpu().double(), positive.cpu().bool()
    n_pos, n_neg = positive.sum().item(), (~positive).sum().item()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Average 1-based ranks, ties sharing the mean of their ranks (scipy.stats.rankdata's default,
    # computed here because importing scipy.stats costs seconds).
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ranks = (counts.cumsum(0) - (counts - 1) / 2)[inverse]
    return (ranks[positive].sum().item() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
