"""Per-class sufficient statistics of features (count, sum, centred scatter) in float64.

Why centred scatter merged with Chan et al.'s parallel formula (1979) rather than raw
second moments sum(x x^T): covariance from raw moments is S/n - mean mean^T, a difference
of two large, nearly equal numbers when features sit far from the origin (post-ReLU
features do), so digits cancel. The centred scatter never forms that difference, costs
the same one matmul per batch, and two summaries merge exactly (in exact arithmetic):
  M2 = M2_a + M2_b + (n_a n_b / n) delta delta^T,  delta = mean_b - mean_a.
Merging is commutative and associative, so the result does not depend on the order in
which batches or classes arrive (up to float64 rounding, ~1e-13 relative). The same merge of
all classes' statistics gives the background Gaussian of every seen feature (`background`).

`FeatureStats` also holds what the statistics are of: the feature transform every feature
goes through before it is counted (cifarlab.continual.transforms), and optionally a bank of
up to `bank_size` transformed features per class for the kNN novelty score.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import Iterable

import torch
from torch import Tensor

from cifarlab.continual.transforms import apply_transform, check_transform
from cifarlab.errors import ConfigError, DataError


@dataclass(frozen=True)
class ClassStats:
    """Sufficient statistics of one class: count, sum (D,), centred scatter (D, D), float64."""

    count: int
    sum: Tensor
    scatter: Tensor

    @property
    def mean(self) -> Tensor:
        return self.sum / self.count

    @property
    def dim(self) -> int:
        return self.sum.shape[0]

    def covariance(self) -> Tensor:
        """Unbiased covariance scatter / (n - 1) (numpy.cov's default); zero for a single example."""
        return self.scatter / max(self.count - 1, 1)


def check_features(features: Tensor, *, what: str = "features") -> Tensor:
    """Validate a (N, D) feature matrix and return it as float64; DataError on bad shape or NaN/Inf."""
    if features.dim() != 2:
        raise DataError(f"{what}: expected a 2-D (N, D) tensor, got shape {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise DataError(f"{what}: no examples (empty class)")
    if not torch.isfinite(features).all():
        bad = (~torch.isfinite(features)).any(dim=1).sum().item()
        raise DataError(f"{what}: {bad} of {features.shape[0]} rows contain NaN or Inf")
    return features.detach().to(device="cpu", dtype=torch.float64)


def batch_stats(features: Tensor) -> ClassStats:
    """Statistics of one batch (N, D) of a single class."""
    x = check_features(features)
    total = x.sum(dim=0)
    centred = x - total / x.shape[0]
    return ClassStats(count=x.shape[0], sum=total, scatter=centred.T @ centred)


def merge(a: ClassStats, b: ClassStats) -> ClassStats:
    """Statistics of the union of the two example sets (Chan et al. 1979)."""
    if a.dim != b.dim:
        raise DataError(f"cannot merge statistics of feature dimension {a.dim} and {b.dim}")
    n = a.count + b.count
    delta = b.mean - a.mean
    scatter = a.scatter + b.scatter + torch.outer(delta, delta) * (a.count * b.count / n)
    return ClassStats(count=n, sum=a.sum + b.sum, scatter=scatter)


def pooled_covariance(classes: tuple[ClassStats, ...] | list[ClassStats]) -> Tensor:
    """Shared (within-class) covariance: summed class scatters / (N - C), the unbiased LDA estimate."""
    n = sum(c.count for c in classes)
    return torch.stack([c.scatter for c in classes]).sum(dim=0) / max(n - len(classes), 1)


@dataclass(frozen=True)
class StreamStats:
    """Deep SLDA's running shared covariance (Hayes & Kanan, CVPR-W 2020, "Lifelong Machine
    Learning with Deep Streaming Linear Discriminant Analysis"), kept as scatter = t * Sigma_t.

    Unlike ClassStats this depends on the arrival order by design: it is the method's own
    one-example-at-a-time estimate, compared against the exact pooled covariance of `lda`.
    """

    updates: int
    scatter: Tensor

    def covariance(self) -> Tensor:
        return self.scatter / max(self.updates, 1)


def empty_stream(dim: int) -> StreamStats:
    return StreamStats(updates=0, scatter=torch.zeros(dim, dim, dtype=torch.float64))


def stream_update(stream: StreamStats, before: ClassStats | None, features: Tensor,
                  *, chunk: int = 2048) -> StreamStats:
    """Feed the rows of `features` (one class; `before` = its statistics so far, or None) one
    at a time through SLDA's update, vectorised:

        Sigma_{t+1} = (t Sigma_t + t/(t+1) d d^T) / (t+1),   d = z_t - mu_y (mean before z_t)

    i.e. scatter += t/(t+1) d d^T. Each row's "mean before" is a cumulative sum, so a chunk of
    rows costs one matmul instead of a Python loop, with the same result as the loop.
    The first example of a class has no mean yet; it counts as its own mean (d = 0), whereas
    the reference code starts means at zero and so adds z z^T, which inflates the shared
    covariance along every new class mean.
    """
    x = check_features(features)
    count = before.count if before is not None else 0
    total = before.sum.clone() if before is not None else torch.zeros(x.shape[1], dtype=torch.float64)
    scatter, t = stream.scatter.clone(), stream.updates
    for rows in x.split(chunk):
        n = rows.shape[0]
        prev_sum = total + torch.cumsum(rows, dim=0) - rows           # (n, D) sum before each row
        prev_count = count + torch.arange(n, dtype=torch.float64)     # (n,)
        delta = rows - prev_sum / prev_count.clamp(min=1).unsqueeze(1)
        delta[prev_count == 0] = 0.0
        steps = t + torch.arange(n, dtype=torch.float64)
        scatter += (delta * (steps / (steps + 1)).unsqueeze(1)).T @ delta
        total, count, t = total + rows.sum(dim=0), count + n, t + n
    return StreamStats(updates=t, scatter=scatter)


def bank_rows(features: Tensor, size: int) -> Tensor:
    """At most `size` rows of one class's features (N, D), evenly spaced over the N, as float32: a choice that
    depends on N only, not on how the rows were batched, so `continual add` keeps what the protocol keeps."""
    n = features.shape[0]
    keep = features if n <= size else features[torch.arange(size) * n // size]
    return keep.to(torch.float32)


@dataclass(frozen=True)
class FeatureStats:
    """Everything the continual classifiers learn: per-class statistics in the order classes
    were learned, plus SLDA's streaming covariance, all of features after `transform`; and, when
    `bank_size` > 0, a bank of up to that many transformed features per class (float32, for the
    kNN novelty score). Immutable: `add_class` returns a new one."""

    classes: tuple[str, ...]
    per_class: tuple[ClassStats, ...]
    stream: StreamStats
    transform: str = "none"
    bank_size: int = 0
    bank: tuple[Tensor, ...] = ()  # one (n_c, D) float32 tensor per class when bank_size > 0, else empty

    @classmethod
    def empty(cls, dim: int, *, transform: str = "none", bank_size: int = 0) -> FeatureStats:
        if bank_size < 0:
            raise ConfigError(f"bank_size must be >= 0 (0: keep no feature bank), got {bank_size}")
        return cls(classes=(), per_class=(), stream=empty_stream(dim), transform=check_transform(transform),
                   bank_size=bank_size)

    @property
    def dim(self) -> int:
        return self.stream.scatter.shape[0]

    def background(self) -> ClassStats:
        """Statistics of all learned features regardless of class: the merge of the class statistics (exact,
        as above), so it needs no storage of its own and adding a class costs one more O(D^2) merge."""
        if not self.per_class:
            raise ConfigError("no class learned yet: the background statistics need at least one class")
        return reduce(merge, self.per_class)

    def add_class(self, name: str, batches: Iterable[Tensor]) -> FeatureStats:
        """Learn a new class from its (untransformed) features, given as batches (N_i, D) in one pass."""
        if name in self.classes:
            raise ConfigError(f"class {name!r} is already learned (learned: {', '.join(self.classes)}); "
                              f"an increment must bring a new class")
        stats, stream, kept = None, self.stream, []
        for i, batch in enumerate(batches):
            x = check_features(batch, what=f"features of class {name!r} (batch {i})")
            if x.shape[1] != self.dim:
                raise DataError(f"features of class {name!r} have dimension {x.shape[1]}, the statistics "
                                f"have {self.dim} (features from another backbone or layer?)")
            x = apply_transform(self.transform, x)
            stream = stream_update(stream, stats, x)
            stats = batch_stats(x) if stats is None else merge(stats, batch_stats(x))
            if self.bank_size:
                kept.append(x.to(torch.float32))
        if stats is None:
            raise DataError(f"class {name!r} has no examples (empty class)")
        bank = self.bank + (bank_rows(torch.cat(kept), self.bank_size),) if self.bank_size else ()
        return FeatureStats(classes=self.classes + (name,), per_class=self.per_class + (stats,), stream=stream,
                            transform=self.transform, bank_size=self.bank_size, bank=bank)
