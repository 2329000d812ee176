"""Shared metrics against hand counts and slow pairwise references."""
from __future__ import annotations

import math

import pytest
import torch

from cifarlab.errors import ConfigError
from cifarlab.metrics import accuracy, auroc, confusion_matrix, fpr_at_tpr, per_class_accuracy


def test_confusion_matrix_matches_hand_count():
    targets = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    preds = torch.tensor([0, 1, 0, 1, 2, 2, 2, 0, 2])
    expected = torch.tensor([[2, 1, 0],
                             [0, 1, 1],
                             [1, 0, 3]])
    cm = confusion_matrix(preds, targets, 3)
    assert cm.dtype == torch.int64
    assert torch.equal(cm, expected)
    assert accuracy(cm) == pytest.approx(6 / 9)
    assert torch.allclose(per_class_accuracy(cm), torch.tensor([2 / 3, 1 / 2, 3 / 4], dtype=torch.float64))


def test_confusion_matrix_matches_loop_reference_on_random_labels():
    g = torch.Generator().manual_seed(0)
    preds, targets = torch.randint(0, 10, (500,), generator=g), torch.randint(0, 10, (500,), generator=g)
    reference = torch.zeros(10, 10, dtype=torch.int64)
    for p, t in zip(preds.tolist(), targets.tolist()):
        reference[t, p] += 1
    assert torch.equal(confusion_matrix(preds, targets, 10), reference)


def test_per_class_accuracy_of_empty_class_is_nan():
    cm = confusion_matrix(torch.tensor([0, 1, 0]), torch.tensor([0, 0, 2]), 3)  # no sample of class 1
    acc = per_class_accuracy(cm)
    assert acc[0].item() == pytest.approx(0.5)
    assert math.isnan(acc[1].item())
    assert acc[2].item() == 0.0


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)


def test_auroc_by_hand():
    # pairs (positive, negative): 3>2, 3>0, 1<2, 1>0 -> 3 of 4
    assert auroc(torch.tensor([3.0, 1.0]), torch.tensor([2.0, 0.0])) == 0.75
    # a tie counts one half: 1=1 (1/2), 1>0 (1) -> 3/4 ... with a second positive 2 > both: (1 + 1 + 1/2 + 1) / 4
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0])) == 0.875
    assert auroc(torch.tensor([5.0, 6.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([5.0, 6.0])) == 0.0


def test_auroc_by_hand_with_a_tie():
    scores_in = torch.tensor([0.1, 0.4, 0.35, 0.8])
    scores_out = torch.tensor([0.9, 0.4, 0.6])
    # pairs won by OOD: 0.9 beats 4; 0.4 beats 2 and ties 1 (counts 1/2); 0.6 beats 3 -> 9.5 of 12
    assert auroc(scores_out, scores_in) == pytest.approx(9.5 / 12)


def test_auroc_matches_pairwise_reference_and_extremes():
    g = torch.Generator().manual_seed(0)
    scores_in = torch.randint(0, 5, (40,), generator=g).float()  # many ties
    scores_out = torch.randint(2, 8, (30,), generator=g).float()
    diff = scores_out[:, None] - scores_in[None, :]
    reference = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()
    assert auroc(scores_out, scores_in) == pytest.approx(reference)
    assert auroc(torch.ones(2), torch.zeros(3)) == 1.0
    assert auroc(torch.zeros(2), torch.ones(3)) == 0.0
    assert auroc(torch.ones(2), torch.ones(3)) == 0.5


def test_auroc_matches_counting_all_pairs():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randint(0, 5, (40,), generator=g).float(), torch.randint(0, 5, (30,), generator=g).float()
    pairs = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
    assert auroc(pos, neg) == pytest.approx(pairs.mean().item(), abs=1e-12)
    with pytest.raises(ConfigError):
        auroc(pos, neg[:0])
    with pytest.raises(ValueError, match="non-empty"):
        auroc(torch.ones(2), torch.zeros(0))


def test_auroc_is_exact_on_a_test_set_sized_input():
    # rank sums of 20,000 scores exceed 2^24, where float32 can no longer hold their halves
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(10_000, generator=g).double(), torch.randn(10_000, generator=g).double().round(decimals=1)
    ordered = neg.sort().values
    below = torch.searchsorted(ordered, pos, side="left")
    ties = torch.searchsorted(ordered, pos, side="right") - below
    wins_doubled = (2 * below + ties).sum().item()  # an exact integer: twice the pairs won
    assert auroc(pos, neg) == wins_doubled / 2 / (len(pos) * len(neg))


def test_fpr_at_95_tpr_by_hand():
    # 20 positives 1..20: flagging 95% of them (19) needs the threshold at the 19th largest, 2.
    positive = torch.arange(1.0, 21.0)
    negative = torch.tensor([0.0, 1.0, 1.5, 2.5, 30.0])
    assert fpr_at_tpr(positive, negative) == pytest.approx(2 / 5)  # 2.5 and 30 are >= 2
    assert fpr_at_tpr(positive, negative, tpr=1.0) == pytest.approx(4 / 5)  # threshold 1: the tied 1.0 is flagged
    assert fpr_at_tpr(positive, negative, tpr=0.5) == pytest.approx(1 / 5)  # 10th largest, 11: only 30
    assert fpr_at_tpr(torch.tensor([5.0, 6.0]), torch.tensor([1.0, 2.0])) == 0.0  # separated
    assert fpr_at_tpr(torch.tensor([1.0, 2.0]), torch.tensor([5.0, 6.0])) == 1.0  # reversed


def test_fpr_at_95_tpr_with_ties():
    # All scores equal: no threshold tells them apart, so flagging 95% of the positives flags every negative.
    assert fpr_at_tpr(torch.ones(10), torch.ones(7)) == 1.0
    # Positives 0 x 5, 1 x 15: 95% of 20 = 19 needs the threshold at 0, which flags every negative >= 0 ...
    positive = torch.tensor([0.0] * 5 + [1.0] * 15)
    assert fpr_at_tpr(positive, torch.tensor([-1.0, 0.0, 0.5, 1.0])) == pytest.approx(3 / 4)
    # ... while 75% (15) is reached at 1, where only the negative tied at 1 is flagged
    assert fpr_at_tpr(positive, torch.tensor([-1.0, 0.0, 0.5, 1.0]), tpr=0.75) == pytest.approx(1 / 4)


def test_fpr_at_tpr_matches_a_threshold_sweep():
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.randint(0, 30, (57,), generator=g).double(), torch.randint(0, 25, (41,), generator=g).double()
    # slow reference: over every candidate threshold, the lowest FPR among those with TPR >= 95%
    best = min((neg >= t).double().mean().item() for t in torch.cat([pos, neg]).unique()
               if (pos >= t).double().mean().item() >= 0.95)
    assert fpr_at_tpr(pos, neg) == best
    with pytest.raises(ConfigError):
        fpr_at_tpr(pos, neg[:0])
    with pytest.raises(ConfigError, match="tpr"):
        fpr_at_tpr(pos, neg, tpr=0.0)
