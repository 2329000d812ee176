"""The 1-D regression demonstration: y = sin(x), data on [-4, -1] and [1, 4], none in the gap [-1, 1].

A method is useful when its predictive std grows where there is no data: in the gap and beyond |x| > 4
(Foong et al. 2019, "'In-Between' Uncertainty in Bayesian Neural Networks", arXiv:1906.11537).
All methods train a 1-100-100-1 ReLU MLP on the same Gaussian loss (noise std 0.1, the noise of the data),
prior (weight decay), epochs, batch size and step sizes a (b + t)^-gamma:

- sgld: SGLD (cifarlab.uncertainty.sgld), `chains` independent chains, one sample per chain and epoch after burn-in.
  One chain stays near one mode in 100 epochs; pooling chains started from different initialisations is
  ordinary MCMC practice and is what makes the gap visible (benchmarks/uncertainty_sine.py shows one chain beside them).
- ensemble: `members` networks trained by SGD from different initialisations and batch orders
  (Lakshminarayanan et al. 2017, without their variance head: the noise std is known here).
- mc-dropout: one network with dropout after each hidden layer, `passes` stochastic passes (Gal & Ghahramani 2016).
- none: one network trained by SGD; it has no notion of uncertainty, so its std is 0 everywhere.

The std reported and plotted is that of the network's output across samples (epistemic); the data's own noise
(0.1) is not added.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from cifarlab.errors import ConfigError
from cifarlab.io import atomic_write, write_json, write_yaml
from cifarlab.uncertainty.sgld import SGLD, polynomial_decay

SINE_METHODS = ("sgld", "mc-dropout", "ensemble", "none")
DATA_RANGES = ((-4.0, -1.0), (1.0, 4.0))
GAP = (-1.0, 1.0)
PLOT_RANGE = (-6.0, 6.0)


@dataclass(frozen=True)
class SineConfig:
    method: str = "sgld"
    epochs: int = 100
    points_per_range: int = 500
    noise_std: float = 0.1  # of the data, and the likelihood's
    hidden: int = 100
    batch_size: int = 50
    lr: float = 2e-3  # SGD-scale step on the mean loss sum (y - f)^2 / (2 noise_std^2) / n
    decay_b: float = 100.0  # lr_t = lr (b / (b + t))^gamma, t in steps
    decay_gamma: float = 1.0
    weight_decay: float = 1e-3  # prior N(0, 1 / (n * weight_decay)) = N(0, 1) for n = 1000
    chains: int = 4  # sgld
    burn_in: int = 50  # sgld: epochs before the first sample
    members: int = 5  # ensemble
    dropout: float = 0.1  # mc-dropout
    passes: int = 100  # mc-dropout
    seed: int = 0

    def validate(self) -> None:
        if self.method not in SINE_METHODS:
            raise ConfigError(f"unknown method {self.method!r}; valid: {', '.join(SINE_METHODS)}")
        for name in ("epochs", "points_per_range", "hidden", "batch_size", "chains", "members", "passes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sine {name} must be >= 1, got {getattr(self, name)}")
        if self.method == "sgld" and not 0 <= self.burn_in < self.epochs:
            raise ConfigError(f"sine burn_in ({self.burn_in}) must be in [0, epochs={self.epochs})")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"sine dropout must be in [0, 1), got {self.dropout}")
        if not (self.noise_std > 0 and self.lr > 0):
            raise ConfigError("sine noise_std and lr must be > 0")


class StackedMLP(nn.Module):
    """K independent ReLU MLPs evaluated together: weights (K, in, out), input (K, B, in) -> (K, B, out).

    Why not K nn.Sequential: one batched matmul runs K chains or members at the cost of one small net on a CPU,
    and one optimizer over the stacked weights updates each copy from its own loss alone.
    Initialised like nn.Linear (uniform +-1/sqrt(fan_in)), each copy independently.
    """

    def __init__(self, copies: int, sizes: tuple[int, ...], *, dropout: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(_uniform((copies, fan_in, fan_out), bound, generator)))
            self.biases.append(nn.Parameter(_uniform((copies, 1, fan_out), bound, generator)))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)  # (K, B, out)
            if i < last:
                x = self.dropout(x.relu())
        return x


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator | None) -> Tensor:
    return torch.rand(shape, generator=generator).mul_(2 * bound).sub_(bound)


def make_data(config: SineConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """x uniform on each data range, y = sin(x) + N(0, noise_std^2); both (N, 1)."""
    n = config.points_per_range
    x = torch.cat([lo + (hi - lo) * torch.rand(n, generator=generator) for lo, hi in DATA_RANGES])[:, None]
    return x, torch.sin(x) + config.noise_std * torch.randn(x.shape, generator=generator)


def fit_sine(config: SineConfig, x: Tensor, y: Tensor, grid: Tensor) -> Tensor:
    """Train per config.method (a validated config); the network's outputs on `grid` (G, 1) per sample, (S, G)."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # dropout masks
    copies = {"sgld": config.chains, "ensemble": config.members}.get(config.method, 1)
    dropout = config.dropout if config.method == "mc-dropout" else 0.0
    net = StackedMLP(copies, (1, config.hidden, config.hidden, 1), dropout=dropout, generator=generator)
    n = len(x)
    if config.method == "sgld":
        optimizer: torch.optim.Optimizer = SGLD(
            net.parameters(), lr=config.lr, num_data=n, weight_decay=config.weight_decay, generator=generator
        )
    else:  # the same steps without the noise: SGD to the MAP estimate under the same prior
        optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = polynomial_decay(optimizer, b=config.decay_b, gamma=config.decay_gamma)

    samples = []
    for epoch in range(config.epochs):
        net.train()
        order = torch.stack([torch.randperm(n, generator=generator) for _ in range(copies)])  # (K, N)
        for batch in order.split(config.batch_size, dim=1):
            # each copy's mean Gaussian NLL on its own batch, summed over copies: gradients stay per copy
            loss = (net(x[batch]) - y[batch]).pow(2).mean(dim=(1, 2)).sum() / (2 * config.noise_std**2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if config.method == "sgld" and epoch >= config.burn_in:
            samples.append(_outputs(net.eval(), grid))  # (K, G)
    net.eval()
    if config.method == "mc-dropout":
        net.dropout.train()  # only dropout stays stochastic; there is no batch norm here
        samples = [_outputs(net, grid) for _ in range(config.passes)]
    elif config.method != "sgld":
        samples = [_outputs(net, grid)]
    return torch.cat(samples)


@torch.no_grad()
def _outputs(net: StackedMLP, grid: Tensor) -> Tensor:
    copies = net.weights[0].shape[0]
    return net(grid.expand(copies, -1, -1)).squeeze(2)  # (K, G)


def std_summary(grid: Tensor, std: Tensor) -> dict[str, float]:
    """Mean std inside the data ranges, in the gap and beyond the data (|x| > 4), and their ratio."""
    x = grid.squeeze(1)
    inside = _in_data(x)
    in_gap = (x >= GAP[0]) & (x <= GAP[1])
    beyond = (x < DATA_RANGES[0][0]) | (x > DATA_RANGES[-1][1])
    std_in_data, std_in_gap = std[inside].mean().item(), std[in_gap].mean().item()
    return {
        "std_in_data": std_in_data,
        "std_in_gap": std_in_gap,
        "std_beyond_data": std[beyond].mean().item(),
        "gap_to_data_ratio": std_in_gap / std_in_data if std_in_data > 0 else None,  # none: 0/0
    }


def run_sine(config: SineConfig, *, out: str | Path | None = None) -> dict[str, Any]:
    """Train, write the run folder (config.yaml, summary.json, sine.png) when `out` is given, return the summary."""
    config.validate()
    data_generator = torch.Generator().manual_seed(config.seed + 1)  # the data does not change with the method
    x, y = make_data(config, data_generator)
    grid = torch.linspace(*PLOT_RANGE, 481)[:, None]  # step 0.025: the range ends +-1, +-4 are grid points
    start = time.perf_counter()
    outputs = fit_sine(config, x, y, grid)  # (S, G)
    seconds = time.perf_counter() - start
    mean = outputs.mean(dim=0)
    std = outputs.std(dim=0, correction=0) if len(outputs) > 1 else torch.zeros_like(mean)
    summary = {
        "method": config.method,
        **std_summary(grid, std),
        "rmse_in_data": _rmse_in_data(grid, mean),
        "samples": len(outputs),
        "train_seconds": seconds,
    }
    if out is not None:
        out = Path(out)
        write_yaml(out / "config.yaml", dataclasses.asdict(config))
        write_json(out / "summary.json", summary)
        plot_sine(x, y, grid, mean, std, out / "sine.png", title=f"{config.method}: {len(outputs)} samples")
    return summary


def _in_data(x: Tensor) -> Tensor:
    return ((x >= DATA_RANGES[0][0]) & (x <= DATA_RANGES[0][1])) | ((x >= DATA_RANGES[1][0]) & (x <= DATA_RANGES[1][1]))


def _rmse_in_data(grid: Tensor, mean: Tensor) -> float:
    x = grid.squeeze(1)
    return (mean - torch.sin(x))[_in_data(x)].pow(2).mean().sqrt().item()


def plot_sine(x: Tensor, y: Tensor, grid: Tensor, mean: Tensor, std: Tensor, path: str | Path, *,
              title: str) -> Path:
    """Top: truth, data, predictive mean +-1 std. Bottom: the std alone, with the gap shaded."""
    g = grid.squeeze(1).numpy()
    mean, std = mean.numpy(), std.numpy()
    fig = Figure(figsize=(8, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    top.scatter(x.squeeze(1).numpy(), y.squeeze(1).numpy(), s=3, color="0.6", alpha=0.5, label="training data")
    top.plot(g, torch.sin(grid.squeeze(1)).numpy(), "k--", lw=1, label="sin(x)")
    top.plot(g, mean, color="C0", label="predictive mean")
    top.fill_between(g, mean - std, mean + std, color="C0", alpha=0.3, label="±1 std")
    top.set_ylim(-2.5, 2.5)
    top.set_ylabel("y")
    top.legend(fontsize=8, loc="upper left")
    top.set_title(title)
    bottom.plot(g, std, color="C3")
    for ax in (top, bottom):
        ax.axvspan(*GAP, color="C1", alpha=0.08)
        ax.grid(alpha=0.3)
    bottom.set_xlabel("x")
    bottom.set_ylabel("predictive std")
    bottom.set_ylim(bottom=0)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
