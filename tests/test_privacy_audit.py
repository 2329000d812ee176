"""Membership-inference audit: the AUC formula by hand, and an overfit model caught by the attack."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.errors import ConfigError
from cifarlab.privacy.audit import loss_threshold_audit, roc_auc


def test_auc_by_hand():
    # pairs (member, non-member): 3>2, 3>0, 1<2, 1>0 -> 3 of 4
    assert roc_auc(torch.tensor([3.0, 1.0]), torch.tensor([2.0, 0.0])) == 0.75
    # a tie counts one half: 1=1 (1/2), 1>0 (1) -> 3/4 ... with a second member 2 > both: (1 + 1 + 1/2 + 1) / 4
    assert roc_auc(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0])) == 0.875
    assert roc_auc(torch.tensor([5.0, 6.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert roc_auc(torch.tensor([1.0, 2.0]), torch.tensor([5.0, 6.0])) == 0.0


def test_auc_matches_counting_all_pairs():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randint(0, 5, (40,), generator=g).float(), torch.randint(0, 5, (30,), generator=g).float()
    pairs = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
    assert roc_auc(pos, neg) == pytest.approx(pairs.mean().item(), abs=1e-12)
    with pytest.raises(ConfigError):
        roc_auc(pos, neg[:0])


def test_overfit_model_is_caught_and_untrained_one_is_not():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 4, 4, generator=g), torch.randint(0, 10, (64,), generator=g)
    members, nonmembers = (x[:32], y[:32]), (x[32:], y[32:])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 256), nn.ReLU(), nn.Linear(256, 10))
    fresh = loss_threshold_audit(model, members, nonmembers)
    assert 0.25 < fresh.auc < 0.75
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):  # memorise the 32 members (labels are random: nothing else to learn)
        optimizer.zero_grad()
        F.cross_entropy(model(members[0]), members[1]).backward()
        optimizer.step()
    audit = loss_threshold_audit(model, members, nonmembers)
    assert audit.auc > 0.95 and audit.member_accuracy == 1.0 and audit.member_loss < audit.nonmember_loss
    assert audit.members == audit.nonmembers == 32
