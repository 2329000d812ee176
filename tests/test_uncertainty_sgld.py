"""SGLD: samples match a known Gaussian posterior; update, schedule, sample collection and prediction."""
import math

import pytest
import torch
from torch import nn

from cifarlab.errors import CheckpointError, ConfigError
from cifarlab.uncertainty.sgld import SGLD, SampleCollector, polynomial_decay, predict_posterior


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_samples_match_bayesian_linear_regression_posterior(temperature):
    # y = X w + noise (std s), prior w ~ N(0, 1/lam): posterior N(mu, Sigma), Sigma = (X'X/s^2 + lam I)^-1,
    # tempered by T: covariance T * Sigma, same mean. 200 independent chains run side by side as rows of W.
    g = torch.Generator().manual_seed(0)
    n, d, s, lam, chains = 200, 2, 0.5, 1.0, 200
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0], dtype=torch.float64) + s * torch.randn(n, generator=g, dtype=torch.float64)
    sigma = torch.linalg.inv(X.T @ X / s**2 + lam * torch.eye(d, dtype=torch.float64))
    mu = sigma @ X.T @ y / s**2

    W = torch.zeros(chains, d, dtype=torch.float64, requires_grad=True)
    opt = SGLD([W], lr=0.01, num_data=n, weight_decay=lam / n, temperature=temperature, generator=g)
    kept = []
    for t in range(800):
        batch = torch.randperm(n, generator=g)[:100]
        # mean Gaussian NLL over the batch, summed over chains so each chain gets its own gradient
        loss = ((y[batch, None] - X[batch] @ W.T) ** 2).sum(dim=1).mean() / (2 * s**2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if t >= 200 and t % 10 == 0:  # burn-in 200 steps (mixing time ~ 1/(lr * curvature) ~ 25), thin 10
            kept.append(W.detach().clone())
    samples = torch.cat(kept)
    std = (temperature * sigma.diag()).sqrt()
    assert ((samples.mean(dim=0) - mu).abs() / std).max() < 0.15
    # discretisation and minibatch noise inflate the variance by a few percent at this lr
    scale = torch.outer(std, std)
    assert ((torch.cov(samples.T) - temperature * sigma).abs() / scale).max() < 0.15


def test_step_is_sgd_plus_scaled_gaussian_noise():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    lr, n, wd, temp = 0.1, 50, 0.01, 2.0
    expected_drift = p.detach() - lr * (p.grad + wd * p.detach())
    expected_noise = math.sqrt(2 * lr * temp / n) * torch.randn(5, generator=torch.Generator().manual_seed(7))
    SGLD([p], lr=lr, num_data=n, weight_decay=wd, temperature=temp, generator=torch.Generator().manual_seed(7)).step()
    torch.testing.assert_close(p.detach(), expected_drift + expected_noise)

    q = nn.Parameter(torch.ones(3))
    q.grad = torch.full((3,), 0.5)
    SGLD([q], lr=0.2, num_data=10, temperature=0.0).step()  # T = 0: plain gradient descent
    torch.testing.assert_close(q.detach(), torch.full((3,), 0.9))


def test_bad_hyperparameters_raise_config_errors():
    p = [nn.Parameter(torch.zeros(1))]
    with pytest.raises(ConfigError, match="lr"):
        SGLD(p, lr=0, num_data=10)
    with pytest.raises(ConfigError, match="num_data"):
        SGLD(p, lr=0.1, num_data=0)
    with pytest.raises(ConfigError, match="gamma"):
        polynomial_decay(SGLD(p, lr=0.1, num_data=10), b=10, gamma=2)


def test_polynomial_decay_follows_a_times_b_plus_t_to_minus_gamma():
    opt = SGLD([nn.Parameter(torch.zeros(1))], lr=0.5, num_data=10)
    schedule = polynomial_decay(opt, b=10, gamma=0.55)
    a = 0.5 * 10**0.55
    for t in range(5):
        assert opt.param_groups[0]["lr"] == pytest.approx(a * (10 + t) ** -0.55)
        opt.step()
        schedule.step()


@pytest.mark.parametrize("on_disk", [False, True])
def test_sample_collector_burn_in_thinning_and_storage(tmp_path, on_disk):
    model = nn.Linear(2, 2)
    collector = SampleCollector(burn_in=3, thin=2, directory=tmp_path / "samples" if on_disk else None)
    kept = []
    for t in range(10):
        with torch.no_grad():
            model.weight.fill_(t)
        if collector.offer(t, model):
            kept.append(t)
    assert kept == [3, 5, 7, 9] and len(collector) == 4
    assert [s["weight"][0, 0].item() for s in collector] == [3, 5, 7, 9]  # copies, not live references
    if on_disk:
        reloaded = SampleCollector.from_directory(tmp_path / "samples")
        assert [s["weight"][0, 0].item() for s in reloaded] == [3, 5, 7, 9]


def test_sample_collector_errors(tmp_path):
    with pytest.raises(ConfigError, match="thin"):
        SampleCollector(thin=0)
    with pytest.raises(CheckpointError, match="no posterior samples"):
        SampleCollector.from_directory(tmp_path)
    (tmp_path / "sample_0000.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="sample_0000.pt"):
        list(SampleCollector.from_directory(tmp_path))


def test_predict_posterior_averages_softmax_and_leaves_model_alone():
    model = nn.Linear(1, 2, bias=False)
    original = model.weight.detach().clone()
    samples = [{"weight": torch.tensor([[1.0], [0.0]])}, {"weight": torch.tensor([[0.0], [3.0]])}]
    x = torch.tensor([[1.0], [0.0]])
    probs = predict_posterior(model, samples, x, batch_size=1)
    # x = 1: logits (1, 0) and (0, 3); x = 0: uniform under both
    expected_first = (torch.tensor([1.0, 0.0]).softmax(0) + torch.tensor([0.0, 3.0]).softmax(0)) / 2
    torch.testing.assert_close(probs, torch.stack([expected_first, torch.tensor([0.5, 0.5])]))
    torch.testing.assert_close(model.weight.detach(), original)
    with pytest.raises(ConfigError, match="no posterior samples"):
        predict_posterior(model, [], x)
