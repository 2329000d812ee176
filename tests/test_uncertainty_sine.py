"""The sine demonstration: SGLD's std grows in the gap; run folder contents; the stacked MLP."""
import json

import pytest
import torch
import yaml

from cifarlab.errors import ConfigError
from cifarlab.uncertainty.sine import SineConfig, StackedMLP, run_sine, std_summary



def test_sgld_std_is_larger_in_the_gap_than_in_the_data(tmp_path):
    summary = run_sine(SineConfig(method="sgld"), out=tmp_path)  # the demonstration's own settings
    assert summary["std_in_gap"] / summary["std_in_data"] > 1.5  # measured 4.1 to 5.7 over seeds 0-2
    assert summary["std_beyond_data"] > 1.5 * summary["std_in_data"]
    assert summary["rmse_in_data"] < 0.05  # and the mean still fits sin(x) where there is data
    assert summary["samples"] == 4 * 50  # chains x epochs after burn-in
    assert json.loads((tmp_path / "summary.json").read_text())["std_in_gap"] == summary["std_in_gap"]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["method"] == "sgld"
    assert (tmp_path / "sine.png").read_bytes()[:4] == b"\x89PNG"


def test_plain_network_reports_zero_std():
    summary = run_sine(SineConfig(method="none", epochs=2, points_per_range=50))
    assert summary["std_in_data"] == summary["std_in_gap"] == 0.0
    assert summary["gap_to_data_ratio"] is None


def test_bad_config_names_the_valid_methods():
    with pytest.raises(ConfigError, match="sgld, mc-dropout, ensemble, none"):
        run_sine(SineConfig(method="hmc"))
    with pytest.raises(ConfigError, match="burn_in"):
        run_sine(SineConfig(method="sgld", epochs=10, burn_in=10))


def test_std_summary_regions():
    grid = torch.linspace(-6, 6, 481)[:, None]
    x = grid.squeeze(1)
    summary = std_summary(grid, x.abs())  # std = |x|: mean 2.5 over the data, 0.5 in the gap, 5 beyond
    # (float32 grid points at +-1 and +-4 may fall on either side of the range ends)
    assert summary["std_in_data"] == pytest.approx(2.5, abs=0.03)
    assert summary["std_in_gap"] == pytest.approx(0.5, abs=0.03)
    assert summary["std_beyond_data"] == pytest.approx(5.0, abs=0.03)
    assert summary["gap_to_data_ratio"] == pytest.approx(0.2, abs=0.02)


def test_stacked_mlp_copies_are_independent():
    net = StackedMLP(3, (1, 8, 1), generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 5, 1)
    single = torch.relu(x[1] @ net.weights[0][1] + net.biases[0][1]) @ net.weights[1][1] + net.biases[1][1]
    torch.testing.assert_close(net(x)[1], single)
    net(x)[0].sum().backward()  # a loss on copy 0 leaves the other copies' gradients at zero
    assert net.weights[0].grad[1:].abs().sum() == 0 and net.weights[0].grad[0].abs().sum() > 0
