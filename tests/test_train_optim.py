"""The Muon optimizer: orthogonalised updates on hidden weights, SGD on the rest, through build_optimizer."""
import pytest
import torch
from torch import nn

from cifarlab.config import OptimConfig, RunConfig
from cifarlab.errors import ConfigError
from cifarlab.models import create_model
from cifarlab.train.optim import Muon, build_optimizer, orthogonalize


@pytest.mark.parametrize("shape", [(16, 8), (8, 16), (32, 3, 3, 3)])
def test_orthogonalize_brings_every_singular_value_near_one_and_keeps_the_directions(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    o = orthogonalize(g)
    assert o.shape == g.shape and o.dtype == g.dtype
    m, om = g.reshape(shape[0], -1), o.reshape(shape[0], -1)
    s = torch.linalg.svdvals(om)
    assert s.min() > 0.6 and s.max() < 1.25  # the quintic iteration's band, not exactly 1
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    assert torch.nn.functional.cosine_similarity((u @ vh).flatten(), om.flatten(), dim=0) > 0.97


def test_hidden_weights_get_muon_and_the_head_norms_and_biases_the_sgd_groups():
    model = create_model("fast", num_classes=3, width1=8, width2=8, width3=16, lookahead_every=0, tta=0)
    config = OptimConfig(optimizer="muon", lr=0.1, muon_lr=0.05, weight_decay=5e-4, weight_decay_on="weights")
    muon = build_optimizer(model, config)
    assert isinstance(muon, Muon)
    hidden, head, vectors = muon.param_groups
    assert hidden["muon"] and hidden["lr"] == 0.05 and not head["muon"] and head["lr"] == 0.1
    assert {id(p) for p in hidden["params"]} == {id(m.weight) for m in model.blocks if isinstance(m, nn.Conv2d)}
    assert [id(p) for p in head["params"]] == [id(model.fc.weight)]
    assert vectors["weight_decay"] == 0.0 and all(p.ndim == 1 for p in vectors["params"])


def test_the_sgd_groups_step_exactly_like_torch_sgd():
    generator = torch.Generator().manual_seed(0)
    ours, theirs = nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(5, 3))
    theirs.data.copy_(ours.data)
    muon = Muon([{"params": [ours]}], lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sgd = torch.optim.SGD([theirs], lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for _ in range(4):
        grad = torch.randn(5, 3, generator=generator)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        muon.step()
        sgd.step()
    torch.testing.assert_close(ours, theirs)


def test_one_muon_step_is_the_orthogonalised_nesterov_direction_times_the_learning_rate():
    w = nn.Parameter(torch.randn(6, 4))
    w.grad = torch.randn(6, 4)
    start, grad = w.detach().clone(), w.grad.clone()
    Muon([{"params": [w], "muon": True}], lr=0.2, momentum=0.5, nesterov=True, weight_decay=0.0).step()
    expected = start - 0.2 * orthogonalize(grad + 0.5 * grad) * (6 / 4) ** 0.5  # buffer = g on the first step
    torch.testing.assert_close(w.detach(), expected)


def test_muon_is_a_validated_config_choice():
    config = RunConfig.from_dict({"optim": {"optimizer": "muon", "muon_lr": 0.1, "nesterov": True}})
    assert config.optim.optimizer == "muon" and config.optim.muon_lr == 0.1
    with pytest.raises(ConfigError, match="optim.muon_lr"):
        RunConfig.from_dict({"optim": {"optimizer": "muon", "muon_lr": 0}})
    with pytest.raises(ConfigError, match="no.*outside its classifier head"):
        build_optimizer(nn.BatchNorm1d(4), OptimConfig(optimizer="muon"))


def test_muon_normalize_holds_the_norm_and_keeps_the_direction_of_the_plain_step():
    w, reference = nn.Parameter(torch.randn(6, 4) * 3), nn.Parameter(torch.randn(6, 4))
    reference.data.copy_(w.data)
    grad = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    w.grad, reference.grad = grad.clone(), grad.clone()
    Muon([{"params": [w], "muon": True, "normalize": True}], lr=0.2, momentum=0.5, nesterov=True,
         weight_decay=0.0).step()
    Muon([{"params": [reference], "muon": True}], lr=0.2, momentum=0.5, nesterov=True, weight_decay=0.0).step()
    assert w.norm().item() == pytest.approx(6 ** 0.5, rel=1e-6)
    torch.testing.assert_close(w.detach(), reference.detach() * 6 ** 0.5 / reference.norm())


def test_muon_normalize_drops_the_hidden_weights_decay_and_needs_muon():
    model = create_model("fast", num_classes=3, width1=8, width2=8, width3=16, lookahead_every=0, tta=0)
    hidden, head, _ = build_optimizer(model, OptimConfig(optimizer="muon", muon_normalize=True)).param_groups
    assert hidden["normalize"] and hidden["weight_decay"] == 0.0
    assert not head["normalize"] and head["weight_decay"] == 5e-4
    with pytest.raises(ConfigError, match="muon_normalize needs optimizer 'muon'"):
        RunConfig.from_dict({"optim": {"optimizer": "sgd", "muon_normalize": True}})


def test_muon_momentum_applies_to_the_hidden_weights_only_and_is_validated():
    model = create_model("fast", num_classes=3, width1=8, width2=8, width3=16, lookahead_every=0, tta=0)
    hidden, head, vectors = build_optimizer(
        model, OptimConfig(optimizer="muon", momentum=0.85, muon_momentum=0.6)).param_groups
    assert hidden["momentum"] == 0.6 and head["momentum"] == vectors["momentum"] == 0.85
    default, _, _ = build_optimizer(model, OptimConfig(optimizer="muon", momentum=0.85)).param_groups
    assert default["momentum"] == 0.85
    with pytest.raises(ConfigError, match="muon_momentum must be in"):
        RunConfig.from_dict({"optim": {"optimizer": "muon", "muon_momentum": 1.0}})
    with pytest.raises(ConfigError, match="muon_momentum needs optimizer 'muon'"):
        RunConfig.from_dict({"optim": {"optimizer": "sgd", "muon_momentum": 0.5}})

