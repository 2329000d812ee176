"""Images drawn from random processes: training data that holds no real image, so learning from it costs no privacy.

Baradad, Wulff, Wang, Isola, Torralba 2021, "Learning to See by Looking at Noise" (NeurIPS; arXiv:2106.05963) train
contrastive representations on images from procedural models; Tang, Panda, Sehwag, Mittal 2023, "Differentially
Private Image Classification by Learning Priors from Random Processes" (DP-RandP, NeurIPS; arXiv:2306.06076) use
such a representation as the starting point of DP-SGD. The processes here are cheap batched versions of two of
Baradad et al.'s families, written for a CPU:

- `dead_leaves`: the dead-leaves model (Matheron 1968; Lee, Mumford, Huang 2001): opaque discs and rotated squares
  of random colours, radii drawn from the scale-invariant density p(r) ~ r^-3, stacked in random order;
- `textured_dead_leaves`: the same occlusion layout, each shape filled with its own colour modulated by a shared
  1/f noise texture (Baradad et al.'s "dead leaves - textured");
- `spectral_noise`: Gaussian noise with a 1/f^alpha power spectrum (alpha in [1, 3] per image, natural images are
  near 2), stretched and rotated per image, its three fields mixed into colours by a random 3x3 matrix.

Every process renders a whole batch with tensor ops; `random_process_images` draws from one seeded generator, so
the same arguments give the same images.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from cifarlab.config import RANDOM_PROCESSES
from cifarlab.data.preprocess import to_uint8
from cifarlab.errors import ConfigError

SHAPES_PER_IMAGE = 48  # dead-leaves shapes stacked per image: at 32x32, ~10% of pixels keep the background
MIN_RADIUS, MAX_RADIUS = 1.5 / 32, 0.5  # radius range of the shapes, as fractions of the image side
CHUNK = 256  # images rendered at once: a dead-leaves chunk's distances are 256 x 48 x 32 x 32 floats (50 MB)


def random_process_images(count: int, *, seed: int, size: int = 32,
                          processes: Sequence[str] = RANDOM_PROCESSES) -> Tensor:
    """`count` uint8 images (count, 3, size, size), a near-equal share from each of `processes` (in that order,
    process i first taking images i, i + P, ...), the same for the same arguments."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"count must be a positive integer, got {count!r}")
    if not processes:
        raise ConfigError(f"give at least one random process; valid: {', '.join(RANDOM_PROCESSES)}")
    unknown = [name for name in processes if name not in RANDOM_PROCESSES]
    if unknown:
        raise ConfigError(f"unknown random process {unknown[0]!r}; valid: {', '.join(RANDOM_PROCESSES)}")
    generator = torch.Generator().manual_seed(seed)
    images = torch.empty((count, 3, size, size), dtype=torch.uint8)
    for offset, name in enumerate(processes):
        index = torch.arange(offset, count, len(processes))
        render = _RENDERERS[name]
        for chunk in index.split(CHUNK):
            images[chunk] = to_uint8(render(len(chunk), size, generator))
    return images


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def _grid(size: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates in [0, 1): rows (size, 1) and columns (1, size)."""
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    return centres[:, None], centres[None, :]


def _leaf_layout(batch: int, size: int, generator: torch.Generator) -> Tensor:
    """(batch, size, size) int64: at each pixel the topmost of SHAPES_PER_IMAGE shapes covering it (1-based), 0 where
    none does (the background)."""
    k = SHAPES_PER_IMAGE
    # Inverse CDF of p(r) ~ r^-3 on [MIN_RADIUS, MAX_RADIUS]: many small shapes, few large ones, at every scale alike.
    u = torch.rand((batch, k), generator=generator)
    radius = (MIN_RADIUS**-2 - u * (MIN_RADIUS**-2 - MAX_RADIUS**-2)) ** -0.5
    centre = _uniform((batch, k, 2), -0.1, 1.1, generator)  # shapes may hang over the border
    angle = _uniform((batch, k), 0, math.pi / 2, generator)
    square = torch.rand((batch, k), generator=generator) < 0.5
    rows, cols = _grid(size)
    dy = rows - centre[..., 0, None, None]  # (batch, k, size, size)
    dx = cols - centre[..., 1, None, None]
    cos, sin = angle.cos()[..., None, None], angle.sin()[..., None, None]
    # A square's "radius" is the larger of the two rotated offsets, a disc's the Euclidean one.
    square_distance = torch.maximum((cos * dx + sin * dy).abs(), (cos * dy - sin * dx).abs())
    distance = torch.where(square[..., None, None], square_distance, (dx * dx + dy * dy).sqrt())
    inside = distance < radius[..., None, None]
    # Later shapes lie on top: the largest covering index wins.
    return (inside * torch.arange(1, k + 1).view(1, k, 1, 1)).amax(1)


def _paint(layout: Tensor, colours: Tensor) -> Tensor:
    """Look up each pixel's shape colour: layout (B, H, W) indices into colours (B, K + 1, C) -> (B, C, H, W)."""
    batch, height, width = layout.shape
    picked = colours.gather(1, layout.view(batch, -1, 1).expand(-1, -1, colours.shape[-1]))  # (B, H*W, C)
    return picked.transpose(1, 2).reshape(batch, -1, height, width)


def dead_leaves(batch: int, size: int, generator: torch.Generator) -> Tensor:
    """Float (batch, 3, size, size) in [0, 1]: flat-coloured discs and squares occluding each other."""
    layout = _leaf_layout(batch, size, generator)
    colours = torch.rand((batch, SHAPES_PER_IMAGE + 1, 3), generator=generator)  # index 0: the background
    return _paint(layout, colours)


def textured_dead_leaves(batch: int, size: int, generator: torch.Generator) -> Tensor:
    """Float (batch, 3, size, size) in [0, 1]: dead leaves whose shapes modulate their colour by a 1/f texture."""
    layout = _leaf_layout(batch, size, generator)
    base = torch.rand((batch, SHAPES_PER_IMAGE + 1, 3), generator=generator)
    gain = _uniform((batch, SHAPES_PER_IMAGE + 1, 3), -0.6, 0.6, generator)  # per shape: how the texture shows
    texture = _standardized(_power_law_fields(batch, 1, size, generator))  # (B, 1, H, W), mean 0, std 1
    return (_paint(layout, base) + _paint(layout, gain) * texture / 2).clamp(0, 1)


def spectral_noise(batch: int, size: int, generator: torch.Generator) -> Tensor:
    """Float (batch, 3, size, size) in [0, 1]: three 1/f^alpha fields mixed into colours by a random matrix."""
    fields = _standardized(_power_law_fields(batch, 3, size, generator))
    mixing = torch.randn((batch, 3, 3), generator=generator) / math.sqrt(3)
    mixed = torch.einsum("bij,bjhw->bihw", mixing, fields)
    contrast = _uniform((batch, 1, 1, 1), 0.1, 0.3, generator)
    return (torch.rand((batch, 3, 1, 1), generator=generator) + contrast * mixed).clamp(0, 1)


def _power_law_fields(batch: int, channels: int, size: int, generator: torch.Generator) -> Tensor:
    """(batch, channels, size, size) Gaussian fields whose amplitude spectrum falls as 1/f^(alpha / 2), i.e. power
    1/f^alpha, alpha in [1, 3] per image, the frequency axes stretched (up to 2x) and rotated per image."""
    freq = torch.fft.fftfreq(size)
    fy, fx = freq[:, None], freq[None, :]
    angle = _uniform((batch, 1, 1, 1), 0, math.pi, generator)
    stretch = _uniform((batch, 1, 1, 1), 0.5, 2.0, generator)
    u = angle.cos() * fx + angle.sin() * fy
    v = angle.cos() * fy - angle.sin() * fx
    radius = (stretch * u**2 + v**2 / stretch).sqrt().clamp_min(1 / size)  # no infinite power at f = 0
    alpha = _uniform((batch, 1, 1, 1), 1.0, 3.0, generator)
    noise = torch.randn((batch, channels, size, size), generator=generator)
    return torch.fft.ifft2(torch.fft.fft2(noise) * radius ** (-alpha / 2)).real


def _standardized(x: Tensor) -> Tensor:
    """Each (image, channel) map shifted and scaled to mean 0, standard deviation 1."""
    mean = x.mean((2, 3), keepdim=True)
    return (x - mean) / x.std((2, 3), keepdim=True).clamp_min(1e-6)


_RENDERERS: dict[str, Callable[[int, int, torch.Generator], Tensor]] = {
    "dead_leaves": dead_leaves,
    "textured_dead_leaves": textured_dead_leaves,
    "spectral_noise": spectral_noise,
}
