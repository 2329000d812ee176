"""Gaussian feature classifiers fitted in closed form from sufficient statistics.

Every method models class c as a Gaussian N(mu_c, Sigma_c) over penultimate features and
differs only in Sigma_c. The registry `METHODS` maps a name to its fit function:

- `lda`: one shared covariance, the pooled within-class estimate (Lee et al., NeurIPS 2018,
  "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
  Attacks"); scores w_c.z - b_c + log prior_c, w_c = Sigma^-1 mu_c, b_c = mu_c.Sigma^-1 mu_c / 2.
- `qda-shrink`: one covariance per class, shrunk toward the shared one, scored by the full
  Gaussian log-likelihood with its log-determinant (in the spirit of FeCAM, Goswami et al.,
  NeurIPS 2023, "FeCAM: Exploiting the Heterogeneity of Class Distributions in Exemplar-Free
  Continual Learning").
- `ncm`: nearest class mean, i.e. LDA with Sigma = I (Mensink et al., TPAMI 2013).
- `slda`: LDA on Deep SLDA's streaming covariance, updated one example at a time
  (Hayes & Kanan, CVPR-W 2020).

Covariances are shrunk toward a scaled identity, (1 - lam) Sigma + lam (tr Sigma / D) I, so
the same lam means the same thing whatever the scale of the features; lam is set by the
user or chosen by OAS (Chen et al. 2010), which, unlike Ledoit-Wolf, needs only the sample
covariance and so works from sufficient statistics. Solves go through a Cholesky factor,
never an explicit inverse.

A classifier applies its statistics' feature transform (cifarlab.continual.transforms) to the
features it is given, so callers always pass the backbone's features. Besides the class
Gaussians it keeps the background Gaussian of all seen features, the reference of the relative
Mahalanobis novelty score (Ren et al. 2021, "A Simple Fix to Mahalanobis Distance for Improving
Near-OOD Detection"); its Cholesky factor is computed on first use, so a method whose user never
asks for that score never needs the background covariance to be well conditioned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch
from torch import Tensor

from cifarlab.config import PRIORS
from cifarlab.continual.stats import FeatureStats, pooled_covariance
from cifarlab.continual.transforms import apply_transform
from cifarlab.errors import ConfigError, DataError

MAX_CONDITION = 1e12  # past this, float64 solves keep fewer than 4 correct digits


@dataclass(frozen=True)
class MethodOptions:
    """shrinkage: lam in [0, 1] or "oas"; class_shrinkage: weight of the shared covariance in
    each class covariance (qda-shrink); prior: "uniform" or "empirical" (class frequencies)."""

    shrinkage: float | str = 1e-4  # Deep SLDA's value; dead ReLU units make some shrinkage necessary
    class_shrinkage: float = 0.9  # best of 0.3..1.0 on tutorial_wide features (base 0-4, then 5..9)
    prior: str = "uniform"

    def __post_init__(self) -> None:
        if self.shrinkage != "oas" and not (isinstance(self.shrinkage, (int, float)) and 0 <= self.shrinkage <= 1):
            raise ConfigError(f"shrinkage must be a number in [0, 1] or 'oas', got {self.shrinkage!r}")
        if not 0 <= self.class_shrinkage <= 1:
            raise ConfigError(f"class_shrinkage must lie in [0, 1], got {self.class_shrinkage!r}")
        if self.prior not in PRIORS:
            raise ConfigError(f"unknown prior {self.prior!r}; valid: {', '.join(PRIORS)}")


@dataclass(frozen=True)
class GaussianClassifier:
    """A fitted method. `chol` is the lower Cholesky factor of the covariance: (D, D) when
    shared by all classes, (C, D, D) when per class; `background_mean` / `background_cov` the
    shrunk Gaussian of all seen features. All tensors float64 on CPU, in the transformed space."""

    method: str
    classes: tuple[str, ...]
    means: Tensor      # (C, D)
    chol: Tensor       # (D, D) or (C, D, D)
    log_prior: Tensor  # (C,)
    transform: str = "none"
    background_mean: Tensor | None = None  # (D,)
    background_cov: Tensor | None = None   # (D, D)

    @property
    def shared(self) -> bool:
        return self.chol.dim() == 2

    def _linear(self) -> tuple[Tensor, Tensor]:
        """w_c = Sigma^-1 mu_c (C, D) and b_c = mu_c . w_c / 2 (C,), for a shared covariance."""
        w = torch.cholesky_solve(self.means.T, self.chol).T
        return w, 0.5 * (self.means * w).sum(dim=1)

    def _log_det(self) -> Tensor:
        """log det Sigma_c per class (C,); zero when shared, since it shifts every class equally."""
        if self.shared:
            return torch.zeros(len(self.classes), dtype=torch.float64)
        return 2 * self.chol.diagonal(dim1=-2, dim2=-1).log().sum(dim=1)

    def features(self, z: Tensor) -> Tensor:
        """The backbone's features z (B, D) as this classifier sees them: float64 on CPU, transformed."""
        return apply_transform(self.transform, z.detach().to(device="cpu", dtype=torch.float64))

    def mahalanobis(self, z: Tensor) -> Tensor:
        """Squared Mahalanobis distance of each row of z (B, D) to each class mean: (B, C)."""
        z = self.features(z)
        if self.shared:
            # ||L^-1 (z - mu)||^2 = z.Sigma^-1 z - 2 (w.z - b): one triangular solve for all classes.
            w, b = self._linear()
            zz = torch.linalg.solve_triangular(self.chol, z.T, upper=False).square().sum(dim=0)
            return (zz.unsqueeze(1) - 2 * (z @ w.T - b)).clamp(min=0)
        return torch.stack([torch.linalg.solve_triangular(l, (z - mu).T, upper=False).square().sum(dim=0)
                            for l, mu in zip(self.chol, self.means)], dim=1)

    def scores(self, z: Tensor) -> Tensor:
        """Class scores (B, C): log-likelihood + log prior, up to a per-row constant."""
        if self.shared:
            w, b = self._linear()
            return self.features(z) @ w.T - b + self.log_prior
        return -0.5 * (self.mahalanobis(z) + self._log_det()) + self.log_prior

    def predict(self, z: Tensor) -> Tensor:
        """Index into `classes` of the best class for each row (B,)."""
        return self.scores(z).argmax(dim=1)

    def novelty(self, z: Tensor) -> Tensor:
        """Novelty score (B,), higher = more likely an unseen class: the smallest distance to a
        learned class, -2 x the best class log-likelihood without prior (Lee et al. 2018)."""
        return (self.mahalanobis(z) + self._log_det()).min(dim=1).values

    @cached_property
    def _background_chol(self) -> Tensor:
        if self.background_mean is None or self.background_cov is None:
            raise ConfigError(f"this {self.method} classifier was built without background statistics; "
                              f"fit it with classifiers.fit")
        return cholesky(self.background_cov, what="background (all classes, relative Mahalanobis)")

    def background_distance(self, z: Tensor) -> Tensor:
        """Squared Mahalanobis distance of each row of z (B, D) to the background Gaussian of every seen
        feature: (B,)."""
        centred = self.features(z) - self.background_mean
        return torch.linalg.solve_triangular(self._background_chol, centred.T, upper=False).square().sum(dim=0)

    def relative_novelty(self, z: Tensor) -> Tensor:
        """Relative Mahalanobis novelty (B,) (Ren et al. 2021): `novelty` minus the distance to the background
        Gaussian, min_c [MD_c(z) (+ log det Sigma_c)] - MD_0(z), i.e. -2 x the log-likelihood ratio of the best
        class against the background, up to a constant. Directions in which every class varies alike (shared
        nuisance, e.g. the feature norm) raise both terms and cancel. As in the paper, the background has its own
        full (shrunk) covariance whatever the method's class covariances are, except for ncm, whose Euclidean class
        distances get a Euclidean background."""
        return self.novelty(z) - self.background_distance(z)


def shrink(cov: Tensor, lam: float) -> Tensor:
    """(1 - lam) cov + lam (tr cov / D) I: toward the isotropic matrix of the same total variance."""
    scale = cov.diagonal().mean()
    if scale <= 0:
        raise DataError("all features are constant (zero variance); these features cannot separate classes")
    return (1 - lam) * cov + lam * scale * torch.eye(cov.shape[0], dtype=cov.dtype)


def oas_shrinkage(cov: Tensor, n: int) -> float:
    """Oracle Approximating Shrinkage intensity (Chen, Wiesel, Eldar & Hero, IEEE TSP 2010, eq. 23)
    for a sample covariance `cov` estimated from n examples."""
    p = cov.shape[0]
    tr, tr2 = cov.trace().item(), (cov * cov).sum().item()  # tr(S), tr(S^2)
    denom = (n + 1 - 2 / p) * (tr2 - tr * tr / p)
    return 1.0 if denom <= 0 else min(((1 - 2 / p) * tr2 + tr * tr) / denom, 1.0)


def cholesky(cov: Tensor, *, what: str, remedy: str = "raise the shrinkage (e.g. 0.01) or use 'oas'") -> Tensor:
    """Lower Cholesky factor; ConfigError if cov is not positive definite or too ill-conditioned."""
    chol, info = torch.linalg.cholesky_ex(cov)
    if info.item() == 0:
        # The squared pivot ratio is a lower bound on the condition number.
        pivots = chol.diagonal().square()
        if (pivots.max() / pivots.min()).item() <= MAX_CONDITION:
            return chol
    raise ConfigError(f"the {what} covariance ({cov.shape[0]}x{cov.shape[0]}) is not positive definite or is "
                      f"numerically singular after shrinkage; {remedy}")


def _shrunk_covariance(cov: Tensor, n: int, options: MethodOptions) -> Tensor:
    lam = oas_shrinkage(cov, n) if options.shrinkage == "oas" else float(options.shrinkage)
    return shrink(cov, lam)


def _log_prior(stats: FeatureStats, options: MethodOptions) -> Tensor:
    counts = torch.tensor([c.count for c in stats.per_class], dtype=torch.float64)
    if options.prior == "uniform":
        return torch.full_like(counts, -math.log(len(counts)))
    return (counts / counts.sum()).log()


def _means(stats: FeatureStats) -> Tensor:
    return torch.stack([c.mean for c in stats.per_class])


def _background(stats: FeatureStats, options: MethodOptions) -> dict[str, Tensor]:
    """The background Gaussian's mean and covariance (around the mean of all seen features), shrunk as the
    method's covariances are."""
    total = stats.background()
    return {"background_mean": total.mean, "background_cov": _shrunk_covariance(total.covariance(),
                                                                                max(total.count - 1, 1), options)}


def _extras(stats: FeatureStats, options: MethodOptions) -> dict[str, object]:
    return {"transform": stats.transform, **_background(stats, options)}


def _shared_covariance(stats: FeatureStats, options: MethodOptions) -> Tensor:
    n = sum(c.count for c in stats.per_class)
    return _shrunk_covariance(pooled_covariance(stats.per_class), max(n - len(stats.classes), 1), options)


def fit_lda(stats: FeatureStats, options: MethodOptions) -> GaussianClassifier:
    chol = cholesky(_shared_covariance(stats, options), what="shared (lda)")
    return GaussianClassifier("lda", stats.classes, _means(stats), chol, _log_prior(stats, options),
                              **_extras(stats, options))


def fit_qda_shrink(stats: FeatureStats, options: MethodOptions) -> GaussianClassifier:
    shared = _shared_covariance(stats, options)
    g = options.class_shrinkage
    chol = torch.stack([cholesky((1 - g) * c.covariance() + g * shared, what=f"class {name!r} (qda-shrink)",
                                 remedy="raise class_shrinkage (e.g. 0.5)")
                        for name, c in zip(stats.classes, stats.per_class)])
    return GaussianClassifier("qda-shrink", stats.classes, _means(stats), chol, _log_prior(stats, options),
                              **_extras(stats, options))


def fit_ncm(stats: FeatureStats, options: MethodOptions) -> GaussianClassifier:
    eye = torch.eye(stats.dim, dtype=torch.float64)
    # The background is measured with Sigma = I like the classes: a Mahalanobis background subtracted from Euclidean
    # class distances ranks unseen classes worse than chance (36-51% AUROC on the 5+5 protocol).
    extras = {**_extras(stats, options), "background_cov": eye}
    return GaussianClassifier("ncm", stats.classes, _means(stats), eye, _log_prior(stats, options), **extras)


def fit_slda(stats: FeatureStats, options: MethodOptions) -> GaussianClassifier:
    cov = _shrunk_covariance(stats.stream.covariance(), max(stats.stream.updates, 1), options)
    chol = cholesky(cov, what="streaming (slda)")
    return GaussianClassifier("slda", stats.classes, _means(stats), chol, _log_prior(stats, options),
                              **_extras(stats, options))


METHODS: dict[str, Callable[[FeatureStats, MethodOptions], GaussianClassifier]] = {
    "lda": fit_lda,
    "qda-shrink": fit_qda_shrink,
    "ncm": fit_ncm,
    "slda": fit_slda,
}


def fit(method: str, stats: FeatureStats, options: MethodOptions = MethodOptions()) -> GaussianClassifier:
    """Fit the named method to the learned statistics."""
    if method not in METHODS:
        raise ConfigError(f"unknown continual method {method!r}; valid: {', '.join(METHODS)}")
    if not stats.classes:
        raise ConfigError("no class learned yet: add at least one class before fitting a classifier")
    return METHODS[method](stats, options)
