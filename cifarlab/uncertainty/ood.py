"""Shifted and out-of-distribution test images the project makes itself, with no extra download.

- Held-out classes: train on some CIFAR-10 classes (data.classes), the test images of the others are OOD.
- Corruptions at 5 severities, after CIFAR-10-C (Hendrycks & Dietterich 2019, arXiv:1903.12261), whose
  severity parameters are used; written as batched tensor functions (B, 3, H, W) float in [0, 1] -> same,
  so they run on the GPU and need no OpenCV/scikit-image.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cifarlab.config import SEVERITIES
from cifarlab.data.preprocess import to_float, to_uint8
from cifarlab.data.sources import Split
from cifarlab.errors import ConfigError

Corruption = Callable[[Tensor, int, "torch.Generator | None"], Tensor]


def gaussian_noise(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    std = (0.04, 0.06, 0.08, 0.09, 0.10)[severity - 1]
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + std * noise).clamp(0, 1)


def shot_noise(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Poisson photon noise: fewer photons (c) per unit intensity is noisier."""
    photons = (500, 250, 100, 75, 50)[severity - 1]
    return (torch.poisson(x * photons, generator=generator) / photons).clamp(0, 1)


def gaussian_blur(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Separable Gaussian filter, edges extended (replicate), kernel radius 4 sigma as scipy/scikit-image."""
    sigma = (0.4, 0.6, 0.7, 0.8, 1.0)[severity - 1]
    radius = int(4 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)  # rows
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)  # columns
    return x.clamp(0, 1)


def contrast(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Shrink each image's pixels toward its per-channel mean."""
    factor = (0.75, 0.5, 0.4, 0.3, 0.15)[severity - 1]
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * factor + mean).clamp(0, 1)


def brightness(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Add c to the HSV value V = max(r, g, b), clipped at 1, keeping hue and saturation.

    With H and S fixed every channel is proportional to V, so the HSV round trip is a per-pixel scaling
    by V' / V; a black pixel (V = 0, saturation 0) becomes grey c.
    """
    c = (0.05, 0.1, 0.15, 0.2, 0.3)[severity - 1]
    value = x.amax(dim=1, keepdim=True)  # (B, 1, H, W)
    new_value = (value + c).clamp(max=1)
    scaled = x * (new_value / value.clamp_min(1e-12))
    return torch.where(value > 0, scaled, new_value.expand_as(x)).clamp(0, 1)


CORRUPTIONS: dict[str, Corruption] = {  # the names of config.CORRUPTIONS
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "brightness": brightness,
}


def corrupt(images: Tensor, name: str, severity: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Corrupt uint8 images (B, 3, H, W) and round back to uint8, as CIFAR-10-C is stored."""
    if name not in CORRUPTIONS:
        raise ConfigError(f"unknown corruption {name!r}; valid: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ConfigError(f"corruption severity must be one of {SEVERITIES}, got {severity}")
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    return to_uint8(CORRUPTIONS[name](to_float(images), severity, generator))


def held_out_classes(split: Split, kept: list[int] | None) -> Split | None:
    """The examples whose (original) label is not among the classes a model was trained on; None if none."""
    if kept is None:
        return None
    mask = ~torch.isin(split.labels, torch.tensor(kept, device=split.labels.device))
    return split.subset(mask.nonzero().squeeze(1)) if mask.any() else None
