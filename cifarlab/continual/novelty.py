"""Novelty scores: how much a test example looks like a class not learned yet (higher = more novel).

The registry `NOVELTY_SCORES` maps a name to what the score reads and how it is computed:

- `mahalanobis` (classifier): the smallest class Mahalanobis distance, -2 x the best class log-likelihood
  (Lee et al., NeurIPS 2018), `GaussianClassifier.novelty`.
- `relative-mahalanobis` (classifier): the same minus the distance to one background Gaussian of every seen
  feature (Ren et al. 2021, "A Simple Fix to Mahalanobis Distance for Improving Near-OOD Detection"),
  `GaussianClassifier.relative_novelty`.
- `knn` (bank): distance to the k-th nearest stored feature, both L2-normalised (Sun et al., ICML 2022,
  "Out-of-Distribution Detection with Deep Nearest Neighbors"); reads the feature bank the statistics keep
  when `bank_size` > 0, so it is the same for every Gaussian method.
- `msp` (logits): minus the maximum softmax probability of a linear head (Hendrycks & Gimpel, ICLR 2017).
- `energy` (logits): minus logsumexp of the logits, the free energy at temperature 1 (Liu et al., NeurIPS
  2020, "Energy-based Out-of-distribution Detection").

Every score is computed on the statistics' transformed features (`FeatureStats.transform`): with `l2`, the
Mahalanobis scores are Mahalanobis++ (Mueller & Hein, ICML 2025); with `tukey`, FeCAM's (Goswami et al.,
NeurIPS 2023) feature transform.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from cifarlab.continual.classifiers import GaussianClassifier
from cifarlab.continual.stats import FeatureStats
from cifarlab.continual.transforms import apply_transform, l2_normalize
from cifarlab.errors import ConfigError, DataError

# Sun et al. use k = 50 over CIFAR-10's 50,000 training features and scale k with the fraction of them kept;
# a bank of 1,000 of 5,000 features per class is a fifth of them, hence 10.
DEFAULT_KNN_K = 10
GAUSSIAN_DEFAULT = "mahalanobis"  # the score of `novelty_auroc_per_step` for the Gaussian methods
HEAD_DEFAULT = "msp"              # and for the softmax heads


def mahalanobis(classifier: GaussianClassifier, z: Tensor) -> Tensor:
    return classifier.novelty(z)


def relative_mahalanobis(classifier: GaussianClassifier, z: Tensor) -> Tensor:
    return classifier.relative_novelty(z)


@torch.no_grad()
def knn_distance(stats: FeatureStats, z: Tensor, *, k: int = DEFAULT_KNN_K, chunk: int = 1024) -> Tensor:
    """Distance of each row of z (B, D; the backbone's features) to its k-th nearest neighbour in the feature bank,
    after the statistics' transform and L2 normalisation of both: (B,) float64.

    On unit vectors ||q - b||^2 = 2 - 2 q.b, so the k-th nearest is the k-th most similar: one matmul per chunk of
    `chunk` queries (in float32, which keeps the order of distances that differ beyond 1e-6) bounds the memory at
    chunk x bank rows."""
    rows = sum(len(b) for b in stats.bank)
    if not stats.bank_size or not rows:
        raise DataError("the knn novelty score needs a feature bank, and these statistics keep none: keep one "
                        "with continual.knn_bank (--knn-bank M, up to M features per class)")
    if not 1 <= k <= rows:
        raise DataError(f"knn: k must lie in [1, {rows}] (the feature bank's size), got {k}")
    bank = l2_normalize(torch.cat(stats.bank).to(torch.float32))  # (R, D)
    queries = l2_normalize(apply_transform(stats.transform, z.detach().to(device="cpu", dtype=torch.float64)))
    similarity = torch.cat([(part.to(torch.float32) @ bank.T).topk(k, dim=1).values[:, -1]
                            for part in queries.split(chunk)])  # (B,) the k-th largest q.b
    return (2 - 2 * similarity.double()).clamp(min=0).sqrt()


def msp(logits: Tensor) -> Tensor:
    return -logits.double().softmax(dim=1).max(dim=1).values


def energy(logits: Tensor) -> Tensor:
    return -logits.double().logsumexp(dim=1)


@dataclass(frozen=True)
class NoveltyScore:
    """needs: "classifier" (a fitted Gaussian classifier and the features), "bank" (the statistics' feature bank
    and the features) or "logits" (a softmax head's logits)."""

    needs: str
    compute: Callable[..., Tensor]
    about: str


NOVELTY_SCORES: dict[str, NoveltyScore] = {
    "mahalanobis": NoveltyScore("classifier", mahalanobis, "smallest class Mahalanobis distance (Lee et al. 2018)"),
    "relative-mahalanobis": NoveltyScore("classifier", relative_mahalanobis,
                                         "class Mahalanobis minus the background Gaussian's (Ren et al. 2021)"),
    "knn": NoveltyScore("bank", knn_distance, "k-th nearest neighbour distance in the feature bank (Sun et al. 2022)"),
    "msp": NoveltyScore("logits", msp, "minus the max softmax probability of the head (Hendrycks & Gimpel 2017)"),
    "energy": NoveltyScore("logits", energy, "minus logsumexp of the head's logits (Liu et al. 2020)"),
}
DEFAULT_NOVELTY_SCORES = ("mahalanobis", "relative-mahalanobis", "msp", "energy")


def check_novelty_scores(names: Sequence[str], *, knn_bank: int) -> tuple[str, ...]:
    """The names, in order and without repeats, if each is a registered score and `knn` has a bank to read
    (`knn_bank` features per class kept); ConfigError otherwise, before any work is done."""
    unknown = [name for name in names if name not in NOVELTY_SCORES]
    if unknown or not names:
        raise ConfigError(f"unknown novelty score(s) {unknown or '(none given)'}; valid: {', '.join(NOVELTY_SCORES)}"
                          f" (or all)")
    if "knn" in names and knn_bank <= 0:
        raise ConfigError("the knn novelty score needs a feature bank: keep up to M features per class with "
                          "continual.knn_bank (--knn-bank M, e.g. 1000), or leave knn out")
    return tuple(dict.fromkeys(names))


def scores_needing(names: Sequence[str], needs: str) -> tuple[str, ...]:
    """Those of `names` that read `needs` ("classifier", "bank" or "logits")."""
    return tuple(name for name in names if NOVELTY_SCORES[name].needs == needs)


def classifier_scores(classifier: GaussianClassifier, z: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """The classifier scores among `names` of the features z (B, D): {name: (B,)}."""
    return {name: NOVELTY_SCORES[name].compute(classifier, z) for name in scores_needing(names, "classifier")}


def bank_scores(stats: FeatureStats, z: Tensor, names: Sequence[str], *, k: int = DEFAULT_KNN_K) -> dict[str, Tensor]:
    """The feature-bank scores among `names` of the features z (B, D): {name: (B,)}."""
    return {name: NOVELTY_SCORES[name].compute(stats, z, k=k) for name in scores_needing(names, "bank")}


def head_scores(logits: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """The head scores among `names` of the logits (B, K): {name: (B,)}."""
    return {name: NOVELTY_SCORES[name].compute(logits) for name in scores_needing(names, "logits")}
