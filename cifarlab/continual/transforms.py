"""Feature transforms applied before the Gaussian statistics are fitted: pure functions, (N, D) in, (N, D) out.

A transform changes the space the class Gaussians live in, so it is a property of the learned statistics
(`FeatureStats.transform`, saved with the state): every feature a state learns from, classifies or scores goes
through the same one. The registry `TRANSFORMS` maps a name to its function:

- `none`: the backbone's features as they are.
- `l2`: each row scaled to unit Euclidean norm (Mahalanobis++, Mueller & Hein, ICML 2025, "Mahalanobis++:
  Improving OOD Detection via Feature Normalization": varying feature norms break the shared-covariance Gaussian
  model; on the unit sphere they cannot). A row of zeros stays zeros.
- `tukey`: Tukey's ladder-of-powers transform x^0.5 per coordinate (FeCAM, Goswami et al., NeurIPS 2023), which
  makes the skewed, non-negative post-ReLU features more Gaussian. Features taken at a layer that can be negative
  get its odd extension sign(x) |x|^0.5: monotone and sign-preserving, equal to x^0.5 where x >= 0.
- `tukey+l2`: the Tukey power, then unit norm.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from cifarlab.errors import ConfigError

TUKEY_POWER = 0.5  # FeCAM's value


def l2_normalize(x: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm; zero rows stay zero (their norm is clamped, not divided by)."""
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def tukey_power(x: Tensor, power: float = TUKEY_POWER) -> Tensor:
    """sign(x) |x|^power per coordinate: x^power on non-negative features, mirrored for negative ones."""
    return x.sign() * x.abs().pow(power)


TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "none": lambda x: x,
    "l2": l2_normalize,
    "tukey": tukey_power,
    "tukey+l2": lambda x: l2_normalize(tukey_power(x)),
}


def check_transform(name: str) -> str:
    """`name` if it is a registered transform; ConfigError listing the valid ones otherwise."""
    if name not in TRANSFORMS:
        raise ConfigError(f"unknown feature transform {name!r}; valid: {', '.join(TRANSFORMS)}")
    return name


def apply_transform(name: str, x: Tensor) -> Tensor:
    """The named transform of the rows of x (N, D); x itself is never modified."""
    return TRANSFORMS[check_transform(name)](x)
