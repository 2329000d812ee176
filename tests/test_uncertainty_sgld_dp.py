"""Li et al.'s clipping norm, and one SGLD-DP step (DP-SGD configured as SGLD) with inactive clipping against one
SGLD step."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.data.loader import BatchLoader
from cifarlab.data.preprocess import fit_preprocessor
from cifarlab.data.sources import Split
from cifarlab.errors import ConfigError
from cifarlab.models import create_model
from cifarlab.uncertainty.sgld import SGLD
from cifarlab.uncertainty.sgld_dp import make_sgld_dp, sgld_clip_norm


def sgld_dp(model, *, num_data, batch_size, **kwargs):
    """SGLD-DP with Poisson batches of expected size `batch_size` over `num_data` examples (the steps below are
    given their batches directly; the loader sets the sampling rate and the expected batch size)."""
    split = Split(torch.zeros(num_data, 1, 1, 1), torch.zeros(num_data, dtype=torch.long))
    loader = BatchLoader(split, batch_size=batch_size,
                         preprocess=fit_preprocessor("none", torch.zeros(2, 3, 2, 2, dtype=torch.uint8)))
    return make_sgld_dp(model, loader, **kwargs)



def test_clip_norm_formula():
    # b sqrt(2) / (sigma sqrt(eta n)) with b=256, sigma=2, eta=0.05, n=50000
    assert sgld_clip_norm(batch_size=256, noise_multiplier=2.0, lr=0.05, num_data=50_000) == pytest.approx(
        256 * math.sqrt(2) / (2.0 * math.sqrt(0.05 * 50_000)))
    # then DP-SGD's noise std eta sigma C / b equals SGLD's sqrt(2 eta T / n), at any temperature
    for temperature in (1.0, 0.1):
        c = sgld_clip_norm(batch_size=64, noise_multiplier=1.5, lr=0.1, num_data=1000, temperature=temperature)
        assert 0.1 * 1.5 * c / 64 == pytest.approx(math.sqrt(2 * 0.1 * temperature / 1000))
    with pytest.raises(ConfigError, match="positive"):
        sgld_clip_norm(batch_size=64, noise_multiplier=0.0, lr=0.1, num_data=1000)


def _problem():
    g = torch.Generator().manual_seed(0)
    x = 0.05 * torch.randn(64, 400, generator=g)  # small inputs: per-example gradient norms far below C
    y = torch.randint(0, 5, (64,), generator=g)
    model = nn.Linear(400, 5)
    return model, x, y


def _update(step, model: nn.Module) -> torch.Tensor:
    before = model.weight.detach().clone()
    step()
    return (model.weight.detach() - before).flatten()


@pytest.mark.parametrize("grad_sample_mode", ["fast", "hooks"])
def test_dp_step_with_inactive_clipping_is_an_sgld_step_in_distribution(grad_sample_mode):
    lr, n, wd = 0.1, 64, 1e-3
    model, x, y = _problem()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    dp = sgld_dp(model, num_data=n, batch_size=n, lr=lr, noise_multiplier=1.3, weight_decay=wd, delta=1e-3,
                 grad_sample_mode=grad_sample_mode)
    model = dp.model
    dp_updates, sgld_updates = [], []
    torch.manual_seed(0)
    for _ in range(10):  # 10 steps x 2000 weights: 20,000 draws of each update's noise
        model.load_state_dict(start)
        dp_updates.append(_update(lambda: dp.step(model, x, y), model))
    assert dp.clipped_fraction() == 0.0 and dp.max_grad_norm > 1

    reference = nn.Linear(400, 5)
    sgld = SGLD(reference.parameters(), lr=lr, num_data=n, weight_decay=wd)
    for _ in range(10):
        reference.load_state_dict(start)

        def sgld_step():
            sgld.zero_grad()
            F.cross_entropy(reference(x), y).backward()
            sgld.step()

        sgld_updates.append(_update(sgld_step, reference))
    dp_updates, sgld_updates = torch.stack(dp_updates), torch.stack(sgld_updates)
    noise_std = math.sqrt(2 * lr / n)
    # same drift (mean update per weight) and noise: std sqrt(2 lr / n), times sqrt(9/10) around a 10-sample mean
    drift_error = (dp_updates.mean(0) - sgld_updates.mean(0)).abs().max().item()
    assert drift_error < 6 * noise_std / math.sqrt(5)  # the difference of two 10-sample means, 6 sigma
    assert (dp_updates - dp_updates.mean(0)).std().item() == pytest.approx(noise_std * math.sqrt(9 / 10), rel=0.03)
    assert (sgld_updates - sgld_updates.mean(0)).std().item() == pytest.approx(noise_std * math.sqrt(9 / 10), rel=0.03)


def test_clipping_is_counted_and_epsilon_grows():
    model, x, y = _problem()
    dp = sgld_dp(model, num_data=64, batch_size=16, lr=0.1, noise_multiplier=1.0, delta=1e-3)
    model = dp.model
    dp.step(model, 100 * x[:16], y[:16])  # large inputs: every gradient exceeds C
    assert dp.clipped_fraction() == 1.0
    first = dp.epsilon()
    dp.step(model, x[16:32], y[16:32])
    assert dp.clipped_fraction() == 0.5 and dp.epsilon() > first > 0
    before = [p.detach().clone() for p in model.parameters()]
    assert dp.step(model, x[:0], y[:0]).count == 0 and dp.steps == 3
    # an empty Poisson batch takes the noise-only step, as in DP-SGD (the accountant counts it)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("grad_sample_mode", ["fast", "hooks"])
def test_cnn_with_in_place_relu_and_dropout_takes_a_step(grad_sample_mode):
    # the comparison's model has in-place ReLUs, which Opacus's hooks forbid on a hooked layer's output
    torch.manual_seed(0)
    model = create_model("cnn", num_classes=3)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    dp = sgld_dp(model, num_data=1000, batch_size=8, lr=0.5, noise_multiplier=1.0, delta=1e-4,
                 grad_sample_mode=grad_sample_mode)
    model = dp.model
    result = dp.step(model.train(), x, y)
    assert result.count == 8 and math.isfinite(float(result.loss_sum)) and dp.examples == 8
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert not torch.equal(model.fc1.weight, start["fc1.weight"])
    model.load_state_dict(start)  # strict: the same parameters and buffers, so checkpoints still load


def test_batch_norm_models_are_refused_with_advice():
    with pytest.raises(ConfigError, match="without batch norm"):
        sgld_dp(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), num_data=100, batch_size=10, lr=0.1,
                noise_multiplier=1.0, delta=1e-3)
