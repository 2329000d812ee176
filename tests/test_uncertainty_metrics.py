"""Uncertainty metrics against values computed by hand on tiny inputs."""
import math

import pytest
import torch

from cifarlab.uncertainty import metrics as M

# confidences 0.9 (right), 0.65 (wrong), 0.7 (right), 0.85 (wrong): none on a bin edge k/15
PROBS = torch.tensor([[0.9, 0.1], [0.65, 0.35], [0.3, 0.7], [0.15, 0.85]])
LABELS = torch.tensor([0, 1, 1, 0])


def test_accuracy_nll_brier_by_hand():
    assert M.accuracy(PROBS, LABELS) == 0.5
    assert M.nll(PROBS, LABELS) == pytest.approx(-(math.log(0.9) + math.log(0.35) + math.log(0.7) + math.log(0.15)) / 4)
    # per row: (p0 - y0)^2 + (p1 - y1)^2
    rows = [0.1**2 + 0.1**2, 0.65**2 + 0.65**2, 0.3**2 + 0.3**2, 0.85**2 + 0.85**2]
    assert M.brier(PROBS, LABELS) == pytest.approx(sum(rows) / 4)


def test_nll_of_a_confident_miss_is_finite():
    assert M.nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])) == pytest.approx(-math.log(1e-12))


def test_ece_one_example_per_bin():
    # each example alone in its bin: ECE = mean |correct - confidence|
    assert M.ece(PROBS, LABELS) == pytest.approx((0.1 + 0.65 + 0.3 + 0.85) / 4)


def test_ece_two_examples_share_a_bin():
    probs = torch.tensor([[0.91, 0.09], [0.92, 0.08], [0.2, 0.8]])
    labels = torch.tensor([0, 1, 1])
    # 0.91 and 0.92 both in (13/15, 14/15]: accuracy 1/2, confidence 0.915; 0.8 alone in (11/15, 12/15], right
    expected = 2 / 3 * abs(0.5 - 0.915) + 1 / 3 * abs(1 - 0.8)
    assert M.ece(probs, labels) == pytest.approx(expected)
    # one bin: |overall accuracy - mean confidence|
    assert M.ece(probs, labels, n_bins=1) == pytest.approx(abs(2 / 3 - (0.91 + 0.92 + 0.8) / 3))


def test_ece_is_zero_for_a_calibrated_predictor():
    # confidence 0.75 and right 3 times in 4
    probs = torch.tensor([[0.75, 0.25]] * 4)
    assert M.ece(probs, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-12)


def test_reliability_bins_counts_and_empty_bins():
    bins = M.reliability_bins(PROBS, LABELS)
    assert bins.edges.shape == (16,) and bins.count.sum() == 4
    assert bins.count[[9, 10, 12, 13]].tolist() == [1, 1, 1, 1]  # 0.65, 0.7, 0.85, 0.9
    assert bins.accuracy[[9, 10, 12, 13]].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert bins.confidence[13].item() == pytest.approx(0.9)
    assert torch.isnan(bins.accuracy[0]) and torch.isnan(bins.confidence[14])


def test_predictive_entropy_by_hand():
    probs = torch.tensor([[0.5, 0.5, 0, 0], [1.0, 0, 0, 0], [0.25] * 4])
    assert M.predictive_entropy(probs).tolist() == pytest.approx([math.log(2), 0.0, math.log(4)])


def test_classification_metrics_keys_and_bad_shapes():
    summary = M.classification_metrics(PROBS, LABELS)
    assert set(summary) == {"accuracy", "nll", "brier", "ece", "entropy"}
    with pytest.raises(ValueError, match="probs"):
        M.accuracy(PROBS, LABELS[:3])


def _mean_abs_binomial_deviation(n: int, p: float) -> float:
    """E |X / n - p| for X ~ Binomial(n, p), summed exactly over the distribution."""
    from scipy.stats import binom

    k = torch.arange(n + 1, dtype=torch.float64)
    return float((torch.from_numpy(binom.pmf(k.numpy(), n, p)) * (k / n - p).abs()).sum())


def test_calibrated_ece_matches_the_binomial_noise_of_one_bin():
    # every confidence 0.6 (one bin): ECE of a calibrated predictor = E |accuracy of 400 Bernoulli(0.6) - 0.6|
    probs = torch.tensor([[0.6, 0.3, 0.1]]).expand(400, -1)
    floor = M.calibrated_ece(probs, draws=4000, generator=torch.Generator().manual_seed(0))
    assert floor == pytest.approx(_mean_abs_binomial_deviation(400, 0.6), rel=0.03)  # about 0.0196
    # two bins of 200 (0.6 and 0.9), independent: the weighted sum of each bin's expected deviation
    mixed = torch.cat([probs[:200], torch.tensor([[0.9, 0.05, 0.05]]).expand(200, -1)])
    expected = 0.5 * (_mean_abs_binomial_deviation(200, 0.6) + _mean_abs_binomial_deviation(200, 0.9))
    assert M.calibrated_ece(mixed, draws=4000, generator=torch.Generator().manual_seed(1)) == pytest.approx(
        expected, rel=0.03)
    assert M.calibrated_ece(torch.tensor([[1.0, 0.0]] * 10)) == 0.0  # certain and right: no noise
    with pytest.raises(ValueError, match="draws"):
        M.calibrated_ece(probs, draws=0)
