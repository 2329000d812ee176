"""Input preprocessing fitted on the training split: per-channel normalisation, mean subtraction, ZCA, GCN + ZCA,
then an optional resize to the network's input size.

The statistics are fitted once on the uint8 training images (`fit_preprocessor`) and stored as buffers of
a `Preprocessor` module that maps float batches in [0, 1] to the model's input. `Preprocessor.state()` is a
plain dict that checkpoints carry, so evaluation, prediction and feature extraction rebuild it without the
dataset, and so resize exactly as training did.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cifarlab.config import PREPROCESSORS, check_input_size
from cifarlab.errors import CheckpointError, ConfigError, DataError

# The buffers each kind of config.PREPROCESSORS needs; forward applies whichever are present, in the order
# mean, std, whiten.
_BUFFERS: dict[str, tuple[str, ...]] = {
    "normalize": ("mean", "std"),
    "mean": ("mean",),
    "zca": ("mean", "whiten"),
    "gcn_zca": ("mean", "whiten"),
    "none": (),
}

# ZCA regulariser added to the covariance eigenvalues. pylearn2's maxout CIFAR-10 pipeline (Goodfellow et al.
# 2013) uses 0.1 on GCN'd images, whose per-pixel variance is ~0.97. Raw CIFAR-10 in [0, 1] has a per-pixel
# variance of ~0.062, so 1e-2 regularises at a similar relative level (0.16 vs 0.10). Measured on 10k training
# images: the eigenvalues above eps are 16% (raw, 1e-2) and 23% (GCN, 0.1) of the 3072 and carry 98.9% and 99.4%
# of the variance; the rest (down to ~1e-6) is mostly JPEG noise that a tiny eps would amplify ~1000x.
DEFAULT_ZCA_EPSILON: dict[str, float] = {"zca": 1e-2, "gcn_zca": 0.1}
# GCN divides each image by its std; the floor stops near-uniform images from having their noise blown up.
# It matches Coates et al. (2011)'s sqrt(var + 10) on 0..255 pixels, i.e. sqrt(10) / 255 ~= 0.0124 in [0, 1].
GCN_MIN_STD = 1e-2


def resize(x: Tensor, size: int) -> Tensor:
    """Float (B, C, H, W) -> (B, C, size, size), bilinear; antialiased when shrinking so that downsizing averages
    pixels instead of skipping them. The batch itself when it already has that size."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < max(x.shape[-2:]))


def to_float(images: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 images (0..255) -> float in [0, 1], always a new tensor."""
    return images.to(dtype, copy=True).div_(255)


def to_uint8(x: Tensor) -> Tensor:
    """Float images in [0, 1] -> uint8 (0..255), rounded to the nearest level; values outside are clipped."""
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def _check_kind(kind: str) -> None:
    if kind not in _BUFFERS:
        raise ConfigError(f"unknown preprocessor {kind!r}; valid: {', '.join(PREPROCESSORS)}")


def global_contrast_normalize(x: Tensor, *, min_std: float = GCN_MIN_STD) -> Tensor:
    """Per image: subtract its mean, divide by its std (floored at `min_std`). Goodfellow et al. 2013 (maxout).

    pylearn2 scales each centred image to L2 norm 55 ~= sqrt(3072), i.e. unit per-pixel std; dividing by
    the std gives the same scale independent of the image size.
    """
    dims = tuple(range(1, x.dim()))
    x = x - x.mean(dim=dims, keepdim=True)
    return x / x.std(dim=dims, keepdim=True, correction=0).clamp_min(min_std)


class Preprocessor(nn.Module):
    """Maps (B, C, H, W) float batches in [0, 1] to normalised float batches of the same device and dtype, resized
    to (size, size) when `size` is set. Normalisation runs first, at the stored resolution its statistics were
    fitted at (a ZCA matrix only fits that one), then the resize: for the per-channel kinds the order does not
    matter, since bilinear weights sum to one."""

    def __init__(
        self,
        kind: str,
        *,
        mean: Tensor | None = None,
        std: Tensor | None = None,
        whiten: Tensor | None = None,
        gcn_min_std: float = GCN_MIN_STD,
        size: int | None = None,
    ) -> None:
        super().__init__()
        _check_kind(kind)
        check_input_size("input size", size)
        given = {"mean": mean, "std": std, "whiten": whiten}
        present = tuple(name for name, value in given.items() if value is not None)
        if present != _BUFFERS[kind]:
            raise ConfigError(f"preprocessor {kind!r} needs tensors {_BUFFERS[kind]}, got {present}")
        self.kind = kind
        self.gcn_min_std = float(gcn_min_std)
        self.size = size
        for name, value in given.items():
            # Buffers (mean (C,1,1) or (C,H,W), std (C,1,1), whiten (D,D)) follow .to(device) with the model.
            self.register_buffer(name, None if value is None else value.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "gcn_zca":
            x = global_contrast_normalize(x, min_std=self.gcn_min_std)
        if self.mean is not None:
            x = x - self.mean.to(x.dtype)
        if self.std is not None:
            x = x / self.std.to(x.dtype)
        if self.whiten is not None:
            # W is symmetric, so right-multiplying rows by W applies W to every flattened image.
            x = (x.flatten(1) @ self.whiten.to(x.dtype)).view_as(x)
        return x if self.size is None else resize(x, self.size)

    def from_uint8(self, images: Tensor) -> Tensor:
        """uint8 images (0..255, any device) -> the model's input, as for evaluation (no augmentation)."""
        return self(to_float(images))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}" + ("" if self.size is None else f", size={self.size}")

    def state(self) -> dict[str, str | float | int | None | Tensor]:
        """Plain dict (str, numbers, None, CPU tensors) that `torch.load(weights_only=True)` accepts."""
        tensors = {name: getattr(self, name).detach().cpu().clone() for name in _BUFFERS[self.kind]}
        return {"kind": self.kind, "gcn_min_std": self.gcn_min_std, "size": self.size, **tensors}

    @classmethod
    def from_state(cls, state: dict) -> Preprocessor:
        """Rebuild exactly the preprocessor whose `state()` this is."""
        if not isinstance(state, dict) or state.get("kind") not in _BUFFERS or "gcn_min_std" not in state:
            raise CheckpointError(f"not a preprocessor state (need 'kind' in {PREPROCESSORS} and 'gcn_min_std')")
        missing = [name for name in _BUFFERS[state["kind"]] if not isinstance(state.get(name), Tensor)]
        if missing:
            raise CheckpointError(f"preprocessor state of kind {state['kind']!r} lacks tensors {missing}")
        tensors = {name: state[name] for name in _BUFFERS[state["kind"]]}
        try:  # checkpoints written before inputs could be resized have no "size": they were not
            return cls(state["kind"], gcn_min_std=state["gcn_min_std"], size=state.get("size"), **tensors)
        except ConfigError as error:
            raise CheckpointError(f"damaged preprocessor state: {error}") from None


def _float64_chunks(images: Tensor, *, batch_size: int, gcn_min_std: float | None) -> Iterator[Tensor]:
    """Yield the images as float64 in [0, 1], `batch_size` at a time, GCN'd when `gcn_min_std` is given."""
    for chunk in images.split(batch_size):
        chunk = to_float(chunk, dtype=torch.float64)
        yield chunk if gcn_min_std is None else global_contrast_normalize(chunk, min_std=gcn_min_std)


def fit_preprocessor(
    kind: str,
    train_images: Tensor,
    *,
    zca_epsilon: float | None = None,
    gcn_min_std: float = GCN_MIN_STD,
    batch_size: int = 1024,
    size: int | None = None,
) -> Preprocessor:
    """Fit `kind` on the uint8 (N, C, H, W) training images only, in float64 over chunks of `batch_size`; the
    preprocessor then resizes its output to (size, size) when `size` is given (see `Preprocessor`).

    Chunks of ~1024 keep the per-pixel sums in cache (4096 is 2-3x slower) and the Gram updates efficient.

    `zca_epsilon` defaults to `DEFAULT_ZCA_EPSILON[kind]`; ZCA (Bell & Sejnowski 1997; Krizhevsky 2009,
    "Learning multiple layers of features from tiny images", appendix) whitens with
    W = U diag(1 / sqrt(s + eps)) U^T from the eigendecomposition U diag(s) U^T of the feature covariance.
    """
    _check_kind(kind)
    if train_images.dtype != torch.uint8 or train_images.dim() != 4 or len(train_images) < 2:
        raise DataError(
            f"fit_preprocessor needs uint8 images (N, C, H, W) with N >= 2, "
            f"got {train_images.dtype} of shape {tuple(train_images.shape)}"
        )
    if zca_epsilon is not None and not zca_epsilon > 0:
        raise ConfigError(f"zca_epsilon must be > 0, got {zca_epsilon}")
    if not gcn_min_std > 0:
        raise ConfigError(f"gcn_min_std must be > 0, got {gcn_min_std}")
    check_input_size("input size", size)
    if kind == "none":
        return Preprocessor("none", size=size)

    n, shape = len(train_images), train_images.shape[1:]
    float64 = {"dtype": torch.float64, "device": train_images.device}
    total, total_sq = torch.zeros(shape, **float64), torch.zeros(shape, **float64)
    gram = torch.zeros(shape.numel(), shape.numel(), **float64) if kind in ("zca", "gcn_zca") else None
    gcn = gcn_min_std if kind == "gcn_zca" else None
    for chunk in _float64_chunks(train_images, batch_size=batch_size, gcn_min_std=gcn):
        total += chunk.sum(0)
        total_sq += chunk.square().sum(0)
        if gram is not None:
            flat = chunk.flatten(1)
            gram.addmm_(flat.T, flat)
    mean = total / n  # (C, H, W) per-pixel mean image

    if kind == "normalize":
        channel_mean = mean.mean(dim=(1, 2), keepdim=True)  # (C, 1, 1)
        channel_var = (total_sq / n).mean(dim=(1, 2), keepdim=True) - channel_mean.square()
        channel_std = channel_var.clamp_min(0).sqrt()
        if (channel_std == 0).any():
            raise DataError(f"cannot normalise: channel std is zero in {channel_std.flatten().tolist()}")
        return Preprocessor(kind, mean=channel_mean.float(), std=channel_std.float(), size=size)
    if kind == "mean":
        return Preprocessor(kind, mean=mean.float(), size=size)

    flat_mean = mean.flatten()
    cov = gram / n - torch.outer(flat_mean, flat_mean)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    eps = DEFAULT_ZCA_EPSILON[kind] if zca_epsilon is None else zca_epsilon
    # Rounding can leave tiny negative eigenvalues; the covariance is positive semi-definite.
    scale = (eigenvalues.clamp_min(0) + eps).rsqrt()
    whiten = (eigenvectors * scale) @ eigenvectors.T
    return Preprocessor(kind, mean=mean.float(), whiten=whiten.float(), gcn_min_std=gcn_min_std, size=size)
