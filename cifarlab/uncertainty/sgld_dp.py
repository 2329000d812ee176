"""DP-SGD that is SGLD: posterior samples and a privacy guarantee from the same run (Li, Chen, Wang & Carin,
"On Connecting Stochastic Gradient MCMC and Differential Privacy", AISTATS 2019, arXiv:1712.09097).

DP-SGD with learning rate eta, expected batch b, noise multiplier sigma and clipping norm C updates
theta <- theta - eta * (sum_i clip_C(g_i) + sigma * C * xi) / b, xi ~ N(0, I). When no gradient is clipped the
noise per coordinate has std eta * sigma * C / b; SGLD at temperature T (cifarlab.uncertainty.sgld) has
sqrt(2 * eta * T / n). They agree when

    C = b * sqrt(2 T) / (sigma * sqrt(eta * n))        (T = 1: Li et al.'s formula)

so DP-SGD with this C and no momentum samples the posterior while clipping is inactive, and the accountant
still bounds the privacy spent, clipped or not. C follows eta when the schedule changes it.
Per-example clipping is cifarlab.privacy.clipping's (single-pass "fast" by default, or Opacus's hooks), the
noise and step Opacus's DP optimizer (dpsgd.ClippedSumOptimizer), as in cifarlab.privacy.dpsgd; batches come
from the run's own Poisson-sampling loader.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from cifarlab.errors import ConfigError
from cifarlab.privacy.accounting import DEFAULT_ACCOUNTANT, DEFAULT_DELTA, check_delta, epsilon
from cifarlab.privacy.clipping import CLIP_METHODS, check_fast_supported, clipped_grad_sum, trainable_parameters
from cifarlab.privacy.dpsgd import ClippedSumOptimizer, disable_inplace, require_per_example_layers
from cifarlab.train.engine import StepResult


def sgld_clip_norm(*, batch_size: float, noise_multiplier: float, lr: float, num_data: int,
                   temperature: float = 1.0) -> float:
    """C = b sqrt(2T) / (sigma sqrt(eta n)): the clipping norm at which DP-SGD's noise is SGLD's."""
    if min(batch_size, noise_multiplier, lr, num_data, temperature) <= 0:
        raise ConfigError(
            f"SGLD-DP needs positive batch size, noise multiplier, lr, data size and temperature; got "
            f"b={batch_size}, sigma={noise_multiplier}, lr={lr}, n={num_data}, T={temperature}"
        )
    return batch_size * math.sqrt(2 * temperature) / (noise_multiplier * math.sqrt(lr * num_data))


class SGLDDP:
    """Wraps a model for DP-SGD-as-SGLD training with the engine: pass `model`, `optimizer`, `train_step`.

    The model itself is trained (and checkpointed by the engine; its in-place activations are turned off); it
    must have per-example layers only (no batch norm). grad_sample_mode: "fast" or "hooks" (cifarlab.privacy.
    clipping). The loader must sample Poisson batches of expected size `batch_size` over `num_data` examples,
    which is what the accountant assumes.
    """

    def __init__(self, model: nn.Module, *, lr: float, num_data: int, batch_size: int, noise_multiplier: float,
                 weight_decay: float = 0.0, temperature: float = 1.0, delta: float = DEFAULT_DELTA,
                 accountant: str = DEFAULT_ACCOUNTANT, grad_sample_mode: str = "fast") -> None:
        check_delta(delta, num_data)
        if grad_sample_mode not in CLIP_METHODS:
            raise ConfigError(f"unknown grad_sample_mode {grad_sample_mode!r}; valid: {', '.join(CLIP_METHODS)}")
        require_per_example_layers(model, purpose="sgld-dp",
                                   fix="use a model without batch norm (e.g. cnn, or wrn with model.args.norm=group)")
        if grad_sample_mode == "fast":
            check_fast_supported(model)
        self.num_data, self.batch_size, self.temperature = num_data, batch_size, temperature
        self.noise_multiplier, self.delta, self.accountant = noise_multiplier, delta, accountant
        self.grad_sample_mode = grad_sample_mode
        self.model = model
        disable_inplace(model)
        # no momentum: Li et al.'s equivalence is for plain SGD; weight decay is the Gaussian prior, not clipped
        sgd = torch.optim.SGD(trainable_parameters(model), lr=lr, weight_decay=weight_decay)
        # adds N(0, sigma^2 C^2) to the clipped sum in p.grad and divides by the expected batch size
        self.optimizer = ClippedSumOptimizer(sgd, noise_multiplier=noise_multiplier, max_grad_norm=self._clip_norm(lr),
                                             expected_batch_size=batch_size, loss_reduction="mean")
        self.steps = self.clipped = self.examples = 0

    def _clip_norm(self, lr: float) -> float:
        return sgld_clip_norm(batch_size=self.batch_size, noise_multiplier=self.noise_multiplier, lr=lr,
                              num_data=self.num_data, temperature=self.temperature)

    @property
    def max_grad_norm(self) -> float:
        return self.optimizer.max_grad_norm

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                   y: torch.Tensor) -> StepResult:
        """One DP-SGD step with C matched to the current lr; counts examples whose gradient was clipped."""
        self.steps += 1  # an empty Poisson batch is a step too: the accountant counts it
        optimizer.zero_grad(set_to_none=True)
        if len(y) == 0:  # nothing to release; the noise-only update is skipped (it carries no data)
            return StepResult(0.0, 0, 0)
        self.optimizer.max_grad_norm = self._clip_norm(optimizer.param_groups[0]["lr"])
        with warnings.catch_warnings():  # grad_sample_mode hooks: the first layer's input needs no gradient
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            result = clipped_grad_sum(model, x, y, max_grad_norm=self.optimizer.max_grad_norm,
                                      method=self.grad_sample_mode)
        self.clipped += int((result.norms > self.optimizer.max_grad_norm).sum())
        self.examples += len(y)
        for p, g in zip(trainable_parameters(model), result.grads):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return StepResult(result.losses.sum(), (result.logits.argmax(1) == y).sum(), len(y))

    def clipped_fraction(self) -> float:
        """Share of per-example gradients clipped so far: where it is not ~0 the run is not exactly SGLD."""
        return self.clipped / max(1, self.examples)

    def epsilon(self) -> float:
        """Privacy spent by the steps taken so far (Poisson rate b / n)."""
        return epsilon(sample_rate=self.batch_size / self.num_data, noise_multiplier=self.noise_multiplier,
                       steps=self.steps, delta=self.delta, accountant=self.accountant)
