"""Continual metrics on hand-made accuracy matrices and scores."""
import math

import pytest
import torch

from cifarlab.continual.metrics import auroc, average_incremental_accuracy, forgetting, fpr95, seen_accuracy

# 3 steps, 4 classes: base {0, 1}, then class 2, then class 3.
ACC = torch.tensor([[0.9, 0.8, 0.0, 0.0],
                    [0.7, 0.8, 0.6, 0.0],
                    [0.5, 0.9, 0.4, 0.8]])
SEEN = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)


def test_seen_and_average_incremental_accuracy():
    torch.testing.assert_close(seen_accuracy(ACC, SEEN), torch.tensor([0.85, 0.7, 0.65], dtype=torch.float64))
    assert average_incremental_accuracy(ACC, SEEN) == pytest.approx((0.85 + 0.7 + 0.65) / 3)


def test_forgetting_is_best_earlier_minus_final_over_classes_learned_before_the_last_step():
    # class 0: 0.9 -> 0.5 (0.4); class 1: best 0.8, final 0.9 (-0.1); class 2: 0.6 -> 0.4 (0.2).
    assert forgetting(ACC, SEEN) == pytest.approx((0.4 - 0.1 + 0.2) / 3)
    assert math.isnan(forgetting(ACC[:1], SEEN[:1]))


def test_auroc_hand_cases():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    positive = torch.tensor([False, False, True, True])
    assert auroc(scores, positive) == pytest.approx(0.75)  # 3 of 4 (pos, neg) pairs ordered right
    assert auroc(-scores, positive) == pytest.approx(0.25)
    assert auroc(torch.ones(4), positive) == pytest.approx(0.5)  # ties count half
    assert math.isnan(auroc(scores, torch.zeros(4, dtype=torch.bool)))


def test_auroc_equals_the_pairwise_definition_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40,), generator=g).double()  # many ties
    positive = torch.rand(40, generator=g) < 0.4
    pos, neg = scores[positive], scores[~positive]
    pairs = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
    assert auroc(scores, positive) == pytest.approx(pairs.mean().item(), abs=1e-12)


def test_fpr95_on_scores_and_a_positive_mask():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.9])
    positive = torch.tensor([False, False, True, True, True])
    # 95% of 3 positives is all 3: threshold 0.35, which flags the negative 0.4 of the two
    assert fpr95(scores, positive) == pytest.approx(0.5)
    assert math.isnan(fpr95(scores, torch.ones(5, dtype=torch.bool)))  # nothing unseen
