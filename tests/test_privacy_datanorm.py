"""Data normalisation: the exact fit, the private release (clipping, noise scale) and its accounting in DP-SGD."""
import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from cifarlab import config
from cifarlab.config import DPConfig
from cifarlab.data.loader import BatchLoader
from cifarlab.data.preprocess import fit_preprocessor
from cifarlab.data.sources import Split
from cifarlab.errors import ConfigError
from cifarlab.models import create_model
from cifarlab.models.scatter import DataNorm, unfitted_data_norm
from cifarlab.privacy import accounting, datanorm
from cifarlab.privacy.dpsgd import make_private, prepare_model

CHANNELS = 243  # the scattering's channels: a model takes such float inputs as its precomputed frozen prefix


def prefix_loader(inputs: torch.Tensor, batch_size: int = 50) -> BatchLoader:
    labels = torch.arange(len(inputs)) % 10
    identity = fit_preprocessor("none", torch.zeros(2, 3, 2, 2, dtype=torch.uint8))  # float inputs pass through
    return BatchLoader(Split(inputs, labels), batch_size=batch_size, preprocess=identity)


def channel_scaled_inputs(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 243, 8, 8) with every channel at its own offset and scale, as scattering channels are."""
    g = torch.Generator().manual_seed(seed)
    offsets, scales = torch.linspace(-2, 2, CHANNELS), torch.linspace(0.1, 3, CHANNELS)
    return offsets[:, None, None] + scales[:, None, None] * torch.randn(n, CHANNELS, 8, 8, generator=g)


def test_exact_fit_standardises_every_channel_and_is_saved_with_the_weights():
    model = create_model("scatter_linear", data_norm=True)
    inputs = channel_scaled_inputs(400)
    assert unfitted_data_norm(model) and not unfitted_data_norm(create_model("scatter_linear"))
    with pytest.raises(RuntimeError, match="before its statistics were fitted"):
        model(inputs[:2])
    assert datanorm.fit_data_norm(model, prefix_loader(inputs)) is None  # exact: nothing to account
    out = model.data_norm(inputs)
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(CHANNELS), atol=1e-4, rtol=0)
    # 1 up to the eps of 1e-5 added to the variances (the smallest is 0.01 here)
    torch.testing.assert_close(out.var((0, 2, 3), unbiased=False), torch.ones(CHANNELS), atol=2e-3, rtol=0)
    again = create_model("scatter_linear", data_norm=True)
    again.load_state_dict(model.state_dict())
    assert not unfitted_data_norm(again)
    torch.testing.assert_close(again(inputs[:3]), model(inputs[:3]))
    # forward stops reading the buffer once it has seen it fitted (a GPU sync per batch), but loading unfitted
    # weights into a checked model makes it refuse again
    again.load_state_dict(create_model("scatter_linear", data_norm=True).state_dict())
    with pytest.raises(RuntimeError, match="before its statistics were fitted"):
        again(inputs[:2])


def test_private_release_clips_each_example_to_C():
    inputs = channel_scaled_inputs(60)
    inputs[0] *= 100  # one outlier, whose moments would dominate an unclipped sum
    clip = 5.0
    model = create_model("scatter_linear", data_norm=True)
    release = datanorm.fit_data_norm(model, prefix_loader(inputs), noise_multiplier=1e-12, clip=clip)
    assert release == (1e-12, 1.0, 1)
    moments = DataNorm.moments(inputs).double()
    clipped = moments * (clip / moments.norm(dim=1)).clamp(max=1)[:, None]
    assert clipped.norm(dim=1).max() <= clip * (1 + 1e-9) and moments[0].norm() > 10 * clip
    mean, mean_square = (clipped.sum(0) / len(inputs)).float().chunk(2)
    torch.testing.assert_close(model.data_norm.mean, mean)
    torch.testing.assert_close(model.data_norm.var, (mean_square - mean.square()).clamp_min(0))


def test_private_release_adds_noise_of_std_sigma_C_to_the_sum():
    n, sigma, clip = 100, 2.0, 3.0
    model = create_model("scatter_linear", data_norm=True)
    zeros = torch.zeros(n, CHANNELS, 8, 8)  # every example's moments are 0: the release is the noise alone
    datanorm.fit_data_norm(model, prefix_loader(zeros), noise_multiplier=sigma, clip=clip,
                           generator=torch.Generator().manual_seed(0))
    noise_sum = model.data_norm.mean.double() * n  # the mean half of the noisy average, times N
    # 243 independent draws: their std is within 15% of sigma * C with probability > 0.99
    assert noise_sum.std().item() == pytest.approx(sigma * clip, rel=0.15)
    assert abs(noise_sum.mean().item()) < 4 * sigma * clip / CHANNELS**0.5


def test_accounting_composes_the_release_with_the_steps():
    release, kw = (8.0, 1.0, 1), dict(sample_rate=0.16, noise_multiplier=4.0, steps=300, delta=1e-5)
    for name, accountant_class in (("prv", PRVAccountant), ("rdp", RDPAccountant)):
        independent = accountant_class()
        independent.history = [release, (4.0, 0.16, 300)]
        ours = accounting.epsilon(**kw, accountant=name, prior=[release])
        with np.errstate(divide="ignore"):  # Opacus's PRV takes log(1 - q) = log(0) for q = 1
            assert ours == pytest.approx(independent.get_epsilon(delta=1e-5), rel=1e-6)
        assert ours > accounting.epsilon(**kw, accountant=name)
    sigma = accounting.noise_for_target_epsilon(3.0, delta=1e-5, sample_rate=0.16, steps=300, prior=[release])
    spent = accounting.epsilon(sample_rate=0.16, noise_multiplier=sigma, steps=300, delta=1e-5, prior=[release])
    assert 3.0 - accounting.EPSILON_TOLERANCE <= spent <= 3.0
    assert sigma > accounting.noise_for_target_epsilon(3.0, delta=1e-5, sample_rate=0.16, steps=300)
    with pytest.raises(ConfigError, match="unreachable"):  # the release alone spends more than the target
        accounting.noise_for_target_epsilon(0.5, delta=1e-5, sample_rate=0.16, steps=300, prior=[(0.5, 1.0, 1)])


def test_make_private_fits_the_statistics_privately_and_counts_them():
    model = prepare_model(create_model("scatter_linear", data_norm=True))
    loader = prefix_loader(channel_scaled_inputs(500), batch_size=100)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    private = make_private(model, optimizer, loader, epochs=2, max_grad_norm=1.0, target_epsilon=5.0, delta=1e-4,
                           accountant="rdp", data_norm_noise=4.0)
    assert not unfitted_data_norm(private.model)
    assert private.accountant.history == [(4.0, 1.0, 1)] and private.steps == 0
    assert private.summary()["data_norm_noise"] == 4.0 and private.epsilon() > 0  # spent before any step
    assert private.epsilon() == pytest.approx(accounting.epsilon(
        sample_rate=0.2, noise_multiplier=1.0, steps=0, delta=1e-4, accountant="rdp", prior=[(4.0, 1.0, 1)]))


def test_config_defaults_are_the_library_defaults():
    assert (DPConfig().data_norm_noise, DPConfig().data_norm_clip) == (config.DEFAULT_DATA_NORM_NOISE, config.DEFAULT_DATA_NORM_CLIP)
    with pytest.raises(ConfigError, match="data_norm_noise"):
        DPConfig(enabled=True, noise_multiplier=1.0, data_norm_noise=0.0).validate()
    with pytest.raises(ConfigError, match="data_norm must be true or false"):
        create_model("scatter_linear", data_norm="yes")
