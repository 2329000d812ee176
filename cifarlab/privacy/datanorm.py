"""Data normalisation under DP: a model's `DataNorm` statistics released once, before DP-SGD, by a Gaussian mechanism.

Tramer & Boneh 2021 (arXiv:2011.11660, section 3) normalise ScatterNet features with training-set statistics
computed privately. Here each training example i contributes its per-channel moments m_i = DataNorm.moments(x_i)
(the channels' spatial means and mean squares, 2C values); the release is

    average = (sum_i clip(m_i, C) + N(0, sigma^2 C^2 I)) / N,    clip(m, C) = m * min(1, C / ||m||),

whose sensitivity to adding or removing one example is C, so it is the Gaussian mechanism with noise multiplier
sigma: in the accountant's terms one step at sampling rate 1, composed with DP-SGD's steps (accounting `prior`).
N, the training-set size, is treated as public, as Opacus does for the expected batch size. A run without DP fits
the same statistics exactly (no clipping, no noise).
"""
from __future__ import annotations

import torch
from torch import nn

from cifarlab.config import DEFAULT_DATA_NORM_CLIP
from cifarlab.data.loader import BatchLoader
from cifarlab.errors import ConfigError
from cifarlab.models.scatter import DataNorm
from cifarlab.privacy.accounting import Release

CHUNK = 2000  # examples per moments batch: the statistics need one pass, not the whole set at once


def fit_data_norm(model: nn.Module, loader: BatchLoader, *, noise_multiplier: float | None = None,
                  clip: float = DEFAULT_DATA_NORM_CLIP, generator: torch.Generator | None = None) -> Release | None:
    """Fit the model's DataNorm to `loader`'s training examples (images or precomputed frozen prefix): privately
    with `noise_multiplier` (returns the release for the accountant), else exactly (returns None). The model must
    have one DataNorm, after its `prefix`."""
    norms = [m for m in model.modules() if isinstance(m, DataNorm)]
    if len(norms) != 1 or not hasattr(model, "prefix"):
        raise ConfigError(f"data normalisation needs a model with one DataNorm after a frozen prefix "
                          f"(scatter_* with data_norm: true); {type(model).__name__} has {len(norms)}")
    private = noise_multiplier is not None
    if private and (noise_multiplier <= 0 or clip <= 0):
        raise ConfigError(f"data normalisation needs noise multiplier > 0 and clip > 0, got {noise_multiplier}, {clip}")
    total = None
    with torch.no_grad():
        for chunk in loader.images.split(CHUNK):
            inputs = chunk if chunk.is_floating_point() else loader.preprocess.from_uint8(chunk)
            moments = DataNorm.moments(model.prefix(inputs).float()).double()  # sums of 50,000 terms: float64
            if private:
                moments = moments * (clip / moments.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)[:, None]
            part = moments.sum(0)
            total = part if total is None else total + part
    total = total.cpu()
    if not private:
        norms[0].set_moments(total / loader.num_examples)
        return None
    noise = torch.normal(0.0, noise_multiplier * clip, total.shape, generator=generator, dtype=torch.float64)
    norms[0].set_moments((total + noise) / loader.num_examples)
    return (float(noise_multiplier), 1.0, 1)
