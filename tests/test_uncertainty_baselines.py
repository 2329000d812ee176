"""MC dropout passes and temperature scaling."""
import pytest
import torch
from torch import nn

from cifarlab.errors import ConfigError
from cifarlab.models import create_model
from cifarlab.uncertainty.baselines import (dropout_layers, fit_temperature, mc_dropout_outputs, predict_mc_dropout,
                                            temperature_scale)
from cifarlab.uncertainty.metrics import ece, nll



def _net(p: float) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(p), nn.Linear(16, 3))


def test_mc_dropout_is_stochastic_keeps_batch_norm_in_eval_and_restores_modes():
    torch.manual_seed(0)
    net = _net(0.5)
    net.train()
    x = torch.randn(8, 4)
    running_mean = net[1].running_mean.clone()
    outputs = mc_dropout_outputs(net, x, passes=5, batch_size=3)
    assert outputs.shape == (5, 8, 3)
    assert not torch.allclose(outputs[0], outputs[1])  # different masks per pass
    torch.testing.assert_close(net[1].running_mean, running_mean)  # BN ran in eval mode: statistics untouched
    assert all(m.training for m in net.modules())  # modes restored
    plain = net.eval()(x)  # the deterministic network (dropout off)
    torch.manual_seed(1)
    probs = predict_mc_dropout(net, x, passes=200)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(8))
    assert (probs.argmax(1) == plain.argmax(1)).float().mean() >= 0.75  # averaging masks stays near the mean net


def test_mc_dropout_refuses_a_model_without_dropout():
    with pytest.raises(ConfigError, match="has none with p > 0"):
        mc_dropout_outputs(_net(0.0), torch.randn(2, 4), passes=3)


def test_mc_dropout_finds_the_cnn_dropout_argument():
    # the comparison's model: its `dropout` argument is the one layer MC dropout switches on at test time
    torch.manual_seed(0)
    model = create_model("cnn", num_classes=3, dropout=0.3)
    assert [m.p for m in dropout_layers(model)] == [0.3]
    outputs = mc_dropout_outputs(model.eval(), torch.randn(4, 3, 32, 32), passes=2)
    assert not torch.allclose(outputs[0], outputs[1]) and not model.training
    assert dropout_layers(create_model("cnn", num_classes=3, dropout=0.0)) == []


def test_temperature_scaling_recovers_the_overconfidence_of_a_synthetic_predictor():
    # labels drawn from softmax(z); the predictor reports softmax(3 z): overconfident by T = 3
    g = torch.Generator().manual_seed(0)
    z = 1.5 * torch.randn(4000, 5, generator=g, dtype=torch.float64)
    labels = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    probs = (3 * z).softmax(1)
    temperature = fit_temperature(probs[:2000], labels[:2000])
    assert temperature == pytest.approx(3.0, rel=0.1)
    test, test_labels = probs[2000:], labels[2000:]
    scaled = temperature_scale(test, temperature)
    assert nll(scaled, test_labels) < nll(test, test_labels) - 0.1
    assert ece(scaled, test_labels) < ece(test, test_labels) / 2
    torch.testing.assert_close(temperature_scale(test, 1.0), test)


def test_temperature_scale_matches_logit_division():
    logits = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(temperature_scale(logits.softmax(1), 2.5), (logits / 2.5).softmax(1))
