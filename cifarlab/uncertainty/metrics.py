"""Metrics of predictive uncertainty, as pure functions of predicted probabilities (N, K) and labels (N,).

Every method (plain network, temperature scaling, MC dropout, ensembles, SGLD) ends in a predictive
distribution p(y | x), an average of softmax outputs, so all metrics take probabilities, not logits.
Definitions follow Guo et al. 2017 (ECE, reliability diagram) and Ovadia et al. 2019 (Brier; the OOD AUROC is cifarlab.metrics.auroc).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ECE_BINS = 15
_TINY = 1e-12  # floor under probabilities before the log: a confident miss costs -log(1e-12) ~ 27.6, not inf


def _check(probs: Tensor, labels: Tensor) -> None:
    if probs.dim() != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(f"expected probs (N, K) and labels (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}")
    if probs.shape[0] == 0:
        raise ValueError("cannot compute a metric over zero examples")


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Fraction of examples whose most probable class is the label."""
    _check(probs, labels)
    return (probs.argmax(dim=1) == labels).double().mean().item()


def nll(probs: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood -log p(y_i | x_i) in nats."""
    _check(probs, labels)
    picked = probs.double().gather(1, labels.long()[:, None]).squeeze(1)
    return -picked.clamp_min(_TINY).log().mean().item()


def brier(probs: Tensor, labels: Tensor) -> float:
    """Mean over examples of sum_k (p_k - 1[k = y])^2 (Brier 1950; in [0, 2], not divided by K)."""
    _check(probs, labels)
    onehot = torch.nn.functional.one_hot(labels.long(), probs.shape[1]).double()
    return (probs.double() - onehot).pow(2).sum(dim=1).mean().item()


def predictive_entropy(probs: Tensor) -> Tensor:
    """Entropy -sum_k p_k log p_k of each row, in nats (N,); 0 log 0 = 0."""
    p = probs.double()
    return -torch.where(p > 0, p * p.clamp_min(_TINY).log(), torch.zeros_like(p)).sum(dim=1)


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width confidence bins: bin b holds confidences in (edges[b], edges[b+1]]."""

    edges: Tensor  # (B + 1,) from 0 to 1
    count: Tensor  # (B,) examples per bin
    accuracy: Tensor  # (B,) accuracy in the bin; nan where empty
    confidence: Tensor  # (B,) mean confidence in the bin; nan where empty


def reliability_bins(probs: Tensor, labels: Tensor, *, n_bins: int = ECE_BINS) -> ReliabilityBins:
    """Bin examples by confidence (max probability) and measure accuracy and mean confidence per bin."""
    _check(probs, labels)
    confidence, predicted = probs.double().max(dim=1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # bucketize with right=False puts x in bin i when edges[i] < x <= edges[i+1], the (lo, hi] convention
    index = torch.bucketize(confidence, edges[1:-1])
    count = torch.bincount(index, minlength=n_bins).double()
    sum_correct = torch.bincount(index, weights=correct, minlength=n_bins)
    sum_confidence = torch.bincount(index, weights=confidence, minlength=n_bins)
    return ReliabilityBins(edges, count.long(), sum_correct / count, sum_confidence / count)  # 0/0 -> nan: empty bin


def ece(probs: Tensor, labels: Tensor, *, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over bins of (bin size / N) * |accuracy - confidence| (Guo et al. 2017)."""
    return bins_ece(reliability_bins(probs, labels, n_bins=n_bins))


def bins_ece(bins: ReliabilityBins) -> float:
    """ECE from reliability bins (empty bins weigh nothing)."""
    full = bins.count > 0
    gap = (bins.accuracy[full] - bins.confidence[full]).abs()
    return (bins.count[full].double() * gap).sum().item() / bins.count.sum().item()


def calibrated_ece(probs: Tensor, *, draws: int = 1000, n_bins: int = ECE_BINS,
                   generator: torch.Generator | None = None) -> float:
    """Mean ECE of a perfectly calibrated predictor with these confidences: each prediction right with
    probability equal to its confidence, `draws` times. The binned estimate is biased upwards by sampling
    noise (about sqrt(2/pi) * sum_b sqrt(n_b c_b (1 - c_b)) / N), so an ECE near this floor cannot be told
    apart from perfect calibration on this many examples."""
    if probs.dim() != 2 or probs.shape[0] == 0:
        raise ValueError(f"expected probs (N, K) with N > 0, got {tuple(probs.shape)}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    confidence = probs.double().max(dim=1).values.cpu()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    index = torch.bucketize(confidence, edges[1:-1])  # the bins of reliability_bins
    correct = torch.bernoulli(confidence.expand(draws, -1), generator=generator)  # (draws, N)
    sum_correct = torch.zeros(draws, n_bins, dtype=torch.float64).index_add_(1, index, correct)
    sum_confidence = torch.bincount(index, weights=confidence, minlength=n_bins)  # (B,), the same every draw
    # sum over bins of (n_b / N) |acc_b - conf_b| = sum over bins of |sum correct - sum confidence| / N
    return ((sum_correct - sum_confidence).abs().sum(dim=1) / len(confidence)).mean().item()


def classification_metrics(probs: Tensor, labels: Tensor) -> dict[str, float]:
    """accuracy, nll, brier, ece and mean predictive entropy of one predictive distribution."""
    return {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
        "ece": ece(probs, labels),
        "entropy": predictive_entropy(probs).mean().item(),
    }
