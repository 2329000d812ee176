"""Batched data augmentation: random crop, translation, horizontal flip, cutout; and the views of contrastive
learning (random resized crop, colour jitter, greyscale), which take float images in [0, 1].

Each function takes a whole (B, C, H, W) batch (uint8 or float) on its device and an explicit
`torch.Generator` on that device, and returns a batch of the same shape and dtype. There are no per-image
Python loops: the per-image randomness becomes index tensors or masks applied to the whole batch at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cifarlab.config import PAD_MODES
from cifarlab.errors import ConfigError


def _check_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")


def _check_pad_mode(name: str, value: str) -> None:
    if value not in PAD_MODES:
        raise ConfigError(f"{name} must be one of {', '.join(PAD_MODES)}, got {value!r}")


def _sample_offsets(x: Tensor, padding: int, *, generator: torch.Generator) -> Tensor:
    """(B, 2) integer (row, col) crop offsets into the padded images, uniform in [0, 2 * padding]."""
    return torch.randint(0, 2 * padding + 1, (len(x), 2), generator=generator, device=x.device)


def _crop(padded: Tensor, offsets: Tensor, size: tuple[int, int]) -> Tensor:
    """Cut the size = (H, W) window at offsets[b] = (row, col) out of each padded image b."""
    # unfold gives a (B, C, rows, cols, H, W) view of every H x W window without copying; one advanced
    # index then picks window offsets[b] of image b, copying only the B*C*H*W output values. This is several
    # times faster on CPU than gathering rows then columns with per-pixel index tensors.
    windows = padded.unfold(2, size[0], 1).unfold(3, size[1], 1).permute(0, 2, 3, 1, 4, 5)
    return windows[torch.arange(len(padded), device=padded.device), offsets[:, 0], offsets[:, 1]]


def random_crop(x: Tensor, padding: int, *, mode: str = "zero", generator: torch.Generator) -> Tensor:
    """Pad each image by `padding` (zeros or reflection) and crop back to H x W at a random offset per image.

    The standard CIFAR augmentation (e.g. He et al. 2016, "Deep Residual Learning", sec. 4.2: pad 4, crop 32).
    """
    _check_size("padding", padding)
    _check_pad_mode("mode", mode)
    if mode == "reflect" and padding >= min(x.shape[-2:]):
        raise ConfigError(f"reflect padding must be < image size {tuple(x.shape[-2:])}, got {padding}")
    if padding == 0:
        return x
    padded = F.pad(x, (padding,) * 4, mode="constant" if mode == "zero" else "reflect")
    return _crop(padded, _sample_offsets(x, padding, generator=generator), x.shape[-2:])


def random_translate(x: Tensor, max_shift: int, *, generator: torch.Generator) -> Tensor:
    """Shift each image by random integers in [-max_shift, max_shift] along each axis, filling with zeros.

    This is exactly a zero-padded random crop with padding `max_shift`.
    """
    _check_size("max_shift", max_shift)
    return random_crop(x, max_shift, mode="zero", generator=generator)


def random_flip(x: Tensor, *, generator: torch.Generator) -> Tensor:
    """Flip each image left-right with probability 0.5."""
    return mirror(x, torch.rand(len(x), generator=generator, device=x.device) < 0.5)


def mirror(x: Tensor, which: Tensor) -> Tensor:
    """Flip left-right the images where the bool (B,) mask `which` is true."""
    return torch.where(which[:, None, None, None], x.flip(-1), x)


def _sample_centres(x: Tensor, *, generator: torch.Generator) -> Tensor:
    """(B, 2) integer (row, col) centres, uniform over the image."""
    h, w = x.shape[-2:]
    rows = torch.randint(0, h, (len(x),), generator=generator, device=x.device)
    cols = torch.randint(0, w, (len(x),), generator=generator, device=x.device)
    return torch.stack([rows, cols], dim=1)


def _erase_squares(x: Tensor, centres: Tensor, size: int) -> Tensor:
    """Zero the size x size square whose top-left corner is centres[b] - size // 2, clipped at the borders."""
    h, w = x.shape[-2:]
    top_left = centres - size // 2  # (B, 2)
    rows = torch.arange(h, device=x.device) - top_left[:, :1]  # (B, H) row position inside the square
    cols = torch.arange(w, device=x.device) - top_left[:, 1:]  # (B, W)
    inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
    # Multiplying by the 0/1 mask is ~4x faster on CPU than masked_fill with a mask broadcast over channels.
    return x * (~inside[:, None]).to(x.dtype)


def cutout(x: Tensor, size: int, *, generator: torch.Generator) -> Tensor:
    """Zero a size x size square (all channels) at a uniformly random centre per image, clipped at the borders.

    DeVries & Taylor 2017, "Improved Regularization of Convolutional Neural Networks with Cutout". They cut
    after normalisation (the square becomes the dataset mean); here it runs before, so the square is black.
    """
    _check_size("size", size)
    if size == 0:
        return x
    return _erase_squares(x, _sample_centres(x, generator=generator), size)


@dataclass(frozen=True)
class Augment:
    """The training augmentation, applied in the order crop, translate, flip, cutout.

    `alternate_flip` (Jordan 2024, arXiv:2404.00498, "derandomized flipping"): the loader mirrors each training image
    in every other epoch instead of in a random half of them, by passing `flips` (BatchLoader.flips); without that
    mask flips are random, as they are in the first epoch."""

    crop_padding: int = 0
    pad_mode: str = "zero"
    translate: int = 0
    flip: bool = False
    alternate_flip: bool = False
    cutout: int = 0

    def __post_init__(self) -> None:
        for name in ("crop_padding", "translate", "cutout"):
            _check_size(f"augment.{name}", getattr(self, name))
        _check_pad_mode("augment.pad_mode", self.pad_mode)
        for name in ("flip", "alternate_flip"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"augment.{name} must be true or false, got {getattr(self, name)!r}")
        if self.alternate_flip and not self.flip:
            raise ConfigError("augment.alternate_flip needs flip: it changes how flips are chosen, not whether")

    @property
    def is_identity(self) -> bool:
        return self.crop_padding == 0 and self.translate == 0 and not self.flip and self.cutout == 0

    def __call__(self, x: Tensor, generator: torch.Generator, flips: Tensor | None = None) -> Tensor:
        """`flips`: a bool (B,) mask of the images to mirror (alternate_flip); None: a random half."""
        x = random_crop(x, self.crop_padding, mode=self.pad_mode, generator=generator)
        x = random_translate(x, self.translate, generator=generator)
        if self.alternate_flip and flips is not None:
            x = mirror(x, flips)
        elif self.flip:
            x = random_flip(x, generator=generator)
        return cutout(x, self.cutout, generator=generator)


# --- the views of contrastive learning (SimCLR, Chen et al. 2020, arXiv:2002.05709): float images in [0, 1] --------

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B in grey, as PIL and torchvision use


def _uniform(n: int, low: float, high: float, *, like: Tensor, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=like.device, dtype=like.dtype)


def grayscale(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    return torch.einsum("c,bchw->bhw", torch.tensor(LUMA, device=x.device, dtype=x.dtype), x)[:, None]


def random_resized_crop(x: Tensor, *, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        generator: torch.Generator) -> Tensor:
    """Crop a random rectangle of each image, area fraction in `scale`, aspect ratio (width / height) log-uniform in
    `ratio`, and resize it back to H x W (bilinear). Szegedy et al. 2015's crop, as SimCLR uses it; a side that would
    exceed the image is cut to it, instead of torchvision's retries."""
    n = len(x)
    area = _uniform(n, *scale, like=x, generator=generator)
    aspect = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), like=x, generator=generator).exp()
    width, height = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)  # fractions of a side
    # affine_grid maps the output's [-1, 1] square to the input's: scale by the crop's half-sides, shift to its centre.
    theta = torch.zeros((n, 2, 3), device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = width, height
    theta[:, 0, 2] = (1 - width) * _uniform(n, -1, 1, like=x, generator=generator)
    theta[:, 1, 2] = (1 - height) * _uniform(n, -1, 1, like=x, generator=generator)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(x: Tensor, *, strength: float, p: float = 0.8, generator: torch.Generator) -> Tensor:
    """With probability `p` per image, scale brightness, contrast and saturation by factors uniform in
    [1 - 0.8 s, 1 + 0.8 s] (s = `strength`; SimCLR's jitter without its hue shift), in that order; clipped to [0, 1]."""
    n, spread = len(x), 0.8 * strength
    factors = [_uniform(n, max(0.0, 1 - spread), 1 + spread, like=x, generator=generator).view(n, 1, 1, 1)
               for _ in range(3)]
    jittered = (x * factors[0]).clamp(0, 1)
    mean = grayscale(jittered).mean((2, 3), keepdim=True)
    jittered = ((jittered - mean) * factors[1] + mean).clamp(0, 1)
    grey = grayscale(jittered)
    jittered = ((jittered - grey) * factors[2] + grey).clamp(0, 1)
    chosen = torch.rand(n, generator=generator, device=x.device) < p
    return torch.where(chosen[:, None, None, None], jittered, x)


def random_grayscale(x: Tensor, *, p: float, generator: torch.Generator) -> Tensor:
    """Replace each image by its luma in all three channels with probability `p`."""
    chosen = torch.rand(len(x), generator=generator, device=x.device) < p
    return torch.where(chosen[:, None, None, None], grayscale(x).expand_as(x), x)
