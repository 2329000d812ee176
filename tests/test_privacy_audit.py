"""Membership-inference audit: an overfit model caught by the attack, an untrained one not."""
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.privacy.audit import loss_threshold_audit


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
