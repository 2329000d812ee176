"""DP-SGD that is SGLD: posterior samples and a privacy guarantee from the same run (Li, Chen, Wang & Carin,
"On Connecting Stochastic Gradient MCMC and Differential Privacy", AISTATS 2019, arXiv:1712.09097).

DP-SGD with learning rate eta, expected batch b, noise multiplier sigma and clipping norm C updates
theta <- theta - eta * (sum_i clip_C(g_i) + sigma * C * xi) / b, xi ~ N(0, I). When no gradient is clipped the
noise per coordinate has std eta * sigma * C / b; SGLD at temperature T (cifarlab.uncertainty.sgld) has
sqrt(2 * eta * T / n). They agree when

    C = b * sqrt(2 T) / (sigma * sqrt(eta * n))        (T = 1: Li et al.'s formula)

so DP-SGD with this C and no momentum samples the posterior while clipping is inactive, and the accountant
still bounds the privacy spent, clipped or not. C follows eta when the schedule changes it.
Here SGLD-DP is a configuration of the DP-SGD machinery (cifarlab.privacy.dpsgd.make_private): the same
per-example clipping, noise, accountant, Poisson batches and empty-batch rule (a noise-only step), with plain SGD
and this C as a function of the current learning rate.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from cifarlab.data.loader import BatchLoader
from cifarlab.errors import ConfigError
from cifarlab.models.per_example import require_per_example_layers
from cifarlab.config import DEFAULT_ACCOUNTANT, DEFAULT_DELTA
from cifarlab.privacy.clipping import trainable_parameters
from cifarlab.privacy.dpsgd import PrivateTraining, make_private, prepare_model


def sgld_clip_norm(*, batch_size: float, noise_multiplier: float, lr: float, num_data: int,
                   temperature: float = 1.0) -> float:
    """C = b sqrt(2T) / (sigma sqrt(eta n)): the clipping norm at which DP-SGD's noise is SGLD's."""
    if min(batch_size, noise_multiplier, lr, num_data, temperature) <= 0:
        raise ConfigError(
            f"SGLD-DP needs positive batch size, noise multiplier, lr, data size and temperature; got "
            f"b={batch_size}, sigma={noise_multiplier}, lr={lr}, n={num_data}, T={temperature}"
        )
    return batch_size * math.sqrt(2 * temperature) / (noise_multiplier * math.sqrt(lr * num_data))


def make_sgld_dp(model: nn.Module, loader: BatchLoader, *, lr: float, noise_multiplier: float,
                 weight_decay: float = 0.0, temperature: float = 1.0, delta: float = DEFAULT_DELTA,
                 accountant: str = DEFAULT_ACCOUNTANT, grad_sample_mode: str = "fast") -> PrivateTraining:
    """DP-SGD that samples the posterior at `temperature`: Poisson batches of expected size loader.batch_size over
    `loader`'s examples, plain SGD at `lr` (no momentum: Li et al.'s equivalence is for plain SGD; weight decay is
    the Gaussian prior, not clipped) and C following the learning rate. The model must have per-example layers
    only (no batch norm): it is trained as it is, to compare with the same network under other methods.
    """
    require_per_example_layers(model, purpose="sgld-dp",
                               fix="use a model without batch norm (e.g. cnn, or wrn with model.args.norm=group)")
    model = prepare_model(model)  # in-place activations off
    sgd = torch.optim.SGD(trainable_parameters(model), lr=lr, weight_decay=weight_decay)
    def clip_norm(lr: float) -> float:
        return sgld_clip_norm(batch_size=loader.batch_size, noise_multiplier=noise_multiplier, lr=lr,
                              num_data=loader.num_examples, temperature=temperature)

    return make_private(model, sgd, loader, epochs=1, max_grad_norm=clip_norm,
                        noise_multiplier=noise_multiplier, delta=delta, accountant=accountant,
                        grad_sample_mode=grad_sample_mode)
