"""Stochastic gradient Langevin dynamics (Welling & Teh 2011): posterior samples from SGD plus the right noise.

The posterior targeted, for N training examples, mean loss L(theta) = -(1/N) sum_i log p(y_i | x_i, theta),
a Gaussian prior N(0, 1/lambda) and temperature T (T = 1: Bayes' posterior; T < 1: a "cold" posterior):

    p_T(theta | D)  proportional to  exp(-(N * L(theta) + lambda/2 * |theta|^2) / T)

Welling & Teh write the update as theta <- theta - (eps/2) (N * grad L + lambda * theta) + N(0, eps * T).
Here it is parametrised like SGD, with lr = eps * N / 2:

    theta <- theta - lr * (grad L + weight_decay * theta) + sqrt(2 * lr * T / N) * xi,   xi ~ N(0, I)

so that lr and weight_decay keep their SGD meaning: weight_decay is the prior precision per example,
lambda = N * weight_decay, and the same lr enters Li et al.'s DP-SGD formula (see sgld_dp.py).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cifarlab.errors import CheckpointError, ConfigError
from cifarlab.io import load_tensors, save_tensors
from cifarlab.train.variant import PlainTraining, StepResult, TrainingVariant


class SGLD(torch.optim.Optimizer):
    """SGLD with an SGD-scaled learning rate; the module docstring gives the target and the update.

    num_data: N, the training set size (the noise shrinks as 1/N: more data, sharper posterior).
    weight_decay: Gaussian prior precision divided by N. temperature: T, scales the noise variance.
    generator: source of the noise (on the parameters' device); None uses torch's global generator.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        *,
        lr: float,
        num_data: int,
        weight_decay: float = 0.0,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        if not lr > 0:
            raise ConfigError(f"SGLD lr must be > 0, got {lr}")
        if num_data < 1:
            raise ConfigError(f"SGLD num_data must be >= 1, got {num_data}")
        if weight_decay < 0:
            raise ConfigError(f"SGLD weight_decay must be >= 0, got {weight_decay}")
        if temperature < 0:
            raise ConfigError(f"SGLD temperature must be >= 0, got {temperature}")
        defaults = {"lr": lr, "num_data": num_data, "weight_decay": weight_decay, "temperature": temperature}
        super().__init__(params, defaults)
        self.generator = generator

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's Optimizer.step signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            noise_std = math.sqrt(2 * lr * group["temperature"] / group["num_data"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                drift = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                p.add_(drift, alpha=-lr)
                if noise_std > 0:
                    noise = torch.randn(p.shape, generator=self.generator, device=p.device, dtype=p.dtype)
                    p.add_(noise, alpha=noise_std)
        return loss


class SGLDTraining(PlainTraining):
    """SGLD as a training variant: the plain step with the SGLD optimizer, whose noise comes from its own generator
    (seeded with `seed`, on `device`) so that a resumed run draws the noise an uninterrupted one would."""

    def __init__(self, model: nn.Module, *, lr: float, num_data: int, weight_decay: float, temperature: float,
                 seed: int, device: torch.device, label_smoothing: float = 0.0, grad_clip: float | None = None) -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)
        optimizer = SGLD([p for p in model.parameters() if p.requires_grad], lr=lr, num_data=num_data,
                         weight_decay=weight_decay, temperature=temperature, generator=self.generator)
        super().__init__(optimizer, label_smoothing=label_smoothing, grad_clip=grad_clip)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def polynomial_decay(optimizer: torch.optim.Optimizer, *, b: float, gamma: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Step size lr_t = a (b + t)^-gamma with a chosen so lr_0 is the optimizer's lr; step it once per batch.

    Welling & Teh's conditions (sum lr_t = inf, sum lr_t^2 < inf) hold for gamma in (0.5, 1].
    """
    if not b > 0 or not 0 <= gamma <= 1:
        raise ConfigError(f"polynomial decay needs b > 0 and gamma in [0, 1], got b={b}, gamma={gamma}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: (b / (b + t)) ** gamma)


class SampleCollector:
    """Keeps the chain's states theta_t for t >= burn_in and (t - burn_in) % thin == 0.

    t counts whatever the caller steps in (batches, epochs). Samples are model state_dicts (buffers such as
    batch-norm statistics included), kept on the CPU in memory, or, with `directory`, saved there as
    sample_0000.pt, ... (torch.save of a state_dict, read back with weights_only=True) so memory stays flat.
    """

    def __init__(self, *, burn_in: int = 0, thin: int = 1, directory: str | Path | None = None) -> None:
        if burn_in < 0 or thin < 1:
            raise ConfigError(f"sample collection needs burn_in >= 0 and thin >= 1, got {burn_in} and {thin}")
        self.burn_in, self.thin = burn_in, thin
        self.directory = None if directory is None else Path(directory)
        self._memory: list[dict[str, Tensor]] = []
        self._files: list[Path] = []

    @classmethod
    def from_directory(cls, directory: str | Path) -> "SampleCollector":
        """The samples a previous run saved in `directory`, in order."""
        files = sorted(Path(directory).glob("sample_*.pt"))
        if not files:
            raise CheckpointError(f"no posterior samples (sample_*.pt) in {directory}")
        collector = cls(directory=directory)
        collector._files = files
        return collector

    def offer(self, t: int, model: nn.Module) -> bool:
        """Keep the model's current state if step t is a sampling step; say whether it was kept."""
        if t < self.burn_in or (t - self.burn_in) % self.thin:
            return False
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if self.directory is None:
            self._memory.append(state)
        else:
            path = self.directory / f"sample_{len(self._files):04d}.pt"
            self._files.append(save_tensors(path, state))
        return True

    def __len__(self) -> int:
        return len(self._files) if self.directory is not None else len(self._memory)

    def state_dict(self) -> dict[str, Any]:
        """The samples kept so far: file names (kept on disk) or the states themselves (kept in memory)."""
        if self.directory is None:
            return {"memory": list(self._memory)}
        return {"files": [path.name for path in self._files]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.directory is None:
            self._memory = list(state["memory"])
        else:
            self._files = [self.directory / name for name in state["files"]]

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        if self.directory is None:
            yield from self._memory
            return
        for path in self._files:
            try:
                yield load_tensors(path, what="posterior sample")
            except Exception as error:  # truncated or foreign file: name it
                raise CheckpointError(f"cannot read posterior sample {path}: {error}") from None


class PosteriorSampling:
    """A training variant (SGLD, SGLD-DP) whose weights at each epoch's end are offered to a SampleCollector
    (t counts epochs); the epoch's metrics row gets the number of samples kept."""

    def __init__(self, variant: TrainingVariant, collector: SampleCollector) -> None:
        self.variant, self.collector = variant, collector
        self.optimizer = variant.optimizer

    @property
    def eval_model(self) -> nn.Module | None:
        return self.variant.eval_model

    def step(self, model: nn.Module, x: Tensor, y: Tensor) -> StepResult:
        return self.variant.step(model, x, y)

    def on_epoch_end(self, epoch: int, model: nn.Module) -> dict[str, float]:
        self.collector.offer(epoch, model)
        return {"posterior_samples": float(len(self.collector)), **self.variant.on_epoch_end(epoch, model)}

    def state_dict(self) -> dict[str, Any]:
        return {"variant": self.variant.state_dict(), "samples": self.collector.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.variant.load_state_dict(state["variant"])
        self.collector.load_state_dict(state["samples"])


@torch.no_grad()
def sample_outputs(model: nn.Module, samples: Iterable[dict[str, Tensor]], x: Tensor, *,
                   batch_size: int = 1000) -> Tensor:
    """Outputs of the model under each posterior sample, (S, N, ...); the caller's model is left unchanged."""
    net = copy.deepcopy(model).eval()
    outputs = []
    for state in samples:
        net.load_state_dict(state)
        outputs.append(torch.cat([net(chunk) for chunk in x.split(batch_size)]))
    if not outputs:
        raise ConfigError("no posterior samples to predict with (is burn_in longer than the run?)")
    return torch.stack(outputs)


def predict_posterior(model: nn.Module, samples: Iterable[dict[str, Tensor]], x: Tensor, *,
                      batch_size: int = 1000) -> Tensor:
    """Posterior predictive p(y | x) = mean over samples of softmax(f_theta(x)), (N, K)."""
    return sample_outputs(model, samples, x, batch_size=batch_size).softmax(dim=-1).mean(dim=0)
