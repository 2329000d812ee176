"""Novelty scores: hand cases, a brute-force kNN, every score on synthetic unseen classes, and where relative
Mahalanobis beats the plain one."""
import numpy as np
import pytest
import torch

from cifarlab import config
from cifarlab.config import RunConfig
from cifarlab.continual.classifiers import MethodOptions, fit
from cifarlab.continual.metrics import auroc
from cifarlab.continual.novelty import (DEFAULT_NOVELTY_SCORES, NOVELTY_SCORES, bank_scores, check_novelty_scores,
                                        classifier_scores, energy, head_scores, knn_distance, msp)
from cifarlab.continual.protocol import ProtocolOptions
from cifarlab.continual.stats import FeatureStats
from cifarlab.continual.transforms import apply_transform, l2_normalize
from cifarlab.errors import ConfigError, DataError

CORNERS = torch.tensor([[3.0, 3.0], [3.0, -3.0], [-3.0, 3.0], [-3.0, -3.0]])


def _world(noise_dims: int, *, n: int = 400, bank: int = 0, seed: int = 0):
    """Four seen classes at the corners of a square in 2 informative coordinates (unit spread), plus `noise_dims`
    coordinates of N(0, 1) noise that every class, seen or not, shares; the unseen class sits at the centre.
    Returns the learned statistics, the test features and which rows are unseen."""
    g = torch.Generator().manual_seed(seed)

    def draw(centre: torch.Tensor, m: int) -> torch.Tensor:
        return torch.cat([centre + torch.randn(m, 2, generator=g), torch.randn(m, noise_dims, generator=g)], dim=1)

    stats = FeatureStats.empty(2 + noise_dims, bank_size=bank)
    for i, corner in enumerate(CORNERS):
        stats = stats.add_class(f"c{i}", draw(corner, n).split(128))
    test = torch.cat([torch.cat([draw(corner, 100) for corner in CORNERS]), draw(torch.zeros(2), 400)])
    return stats, test, torch.arange(len(test)) >= 400


def test_the_names_in_config_are_the_registry_and_bad_names_list_the_valid_ones():
    assert tuple(NOVELTY_SCORES) == config.NOVELTY_SCORES and DEFAULT_NOVELTY_SCORES == config.DEFAULT_NOVELTY_SCORES
    valid = "valid: mahalanobis, relative-mahalanobis, knn, msp, energy"
    with pytest.raises(ConfigError, match=valid):
        check_novelty_scores(("mahalanobis", "odin"), knn_bank=0)
    with pytest.raises(ConfigError, match=valid):
        ProtocolOptions(novelty_scores=())
    with pytest.raises(ConfigError, match="choose one of: mahalanobis, relative-mahalanobis, knn, msp, energy"):
        RunConfig.from_dict({"continual": {"novelty_scores": ["odin"]}})
    assert check_novelty_scores(("msp", "knn", "msp"), knn_bank=5) == ("msp", "knn")


def test_relative_mahalanobis_by_hand():
    """Class a: the square (0|2, 0|2), class b: (4|6, 0|2). Pooled within-class covariance 4/3 I (scatter 8 I over
    8 - 2); background: mean (3, 1), covariance diag(40, 8) / 7."""
    a = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    stats = FeatureStats.empty(2).add_class("a", [a]).add_class("b", [a + torch.tensor([4.0, 0.0])])
    clf = fit("lda", stats, MethodOptions(shrinkage=0.0))
    z = torch.tensor([[3.0, 1.0], [1.0, 3.0]])
    # (3, 1): 2^2 / (4/3) = 3 to both means, 0 to the background's. (1, 3): 2^2 / (4/3) = 3 to a; background
    # 2^2 / (40/7) + 2^2 / (8/7) = 0.7 + 3.5 = 4.2.
    torch.testing.assert_close(clf.background_distance(z), torch.tensor([0.0, 4.2], dtype=torch.float64))
    torch.testing.assert_close(clf.relative_novelty(z), torch.tensor([3.0, 3.0 - 4.2], dtype=torch.float64))
    scores = classifier_scores(clf, z, ("relative-mahalanobis", "msp", "mahalanobis"))
    assert list(scores) == ["relative-mahalanobis", "mahalanobis"]  # the head score needs logits, not a classifier
    torch.testing.assert_close(scores["mahalanobis"], torch.tensor([3.0, 3.0], dtype=torch.float64))


@pytest.mark.parametrize("method", ["lda", "qda-shrink", "ncm"])
def test_relative_mahalanobis_matches_numpy(method):
    stats, z, _ = _world(3, n=60)
    lam = 0.05
    clf = fit(method, stats, MethodOptions(shrinkage=lam))
    # Reference: -2 log N(z; mu_c, Sigma_c) (up to a constant) of the best class minus MD to the background
    # Gaussian of all features (mean and unbiased covariance, shrunk like the method's).
    background = stats.background()
    mean0 = (background.sum / background.count).numpy()
    cov0 = (background.scatter / (background.count - 1)).numpy()
    cov0 = (1 - lam) * cov0 + lam * np.trace(cov0) / cov0.shape[0] * np.eye(cov0.shape[0])
    if method == "ncm":  # Euclidean class distances, Euclidean background
        cov0 = np.eye(cov0.shape[0])
    diff = z.double().numpy() - mean0
    md0 = np.einsum("bd,bd->b", diff, np.linalg.solve(cov0, diff.T).T)
    np.testing.assert_allclose(clf.background_distance(z).numpy(), md0, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(clf.relative_novelty(z).numpy(), clf.novelty(z).numpy() - md0, rtol=1e-9, atol=1e-9)


def test_knn_is_the_kth_nearest_neighbour_on_unit_vectors_of_the_transformed_features():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(40, 6, generator=g) * 3, torch.rand(25, 6, generator=g) * 3 + 1
    z = torch.rand(30, 6, generator=g) * 4
    for transform in ("none", "tukey"):
        stats = FeatureStats.empty(6, transform=transform, bank_size=20).add_class("a", a.split(7)).add_class("b", [b])
        bank = torch.cat([a[torch.arange(20) * 40 // 20], b[torch.arange(20) * 25 // 20]]).double()  # evenly spaced
        keys = l2_normalize(apply_transform(transform, bank))
        queries = l2_normalize(apply_transform(transform, z.double()))
        for k in (1, 5):
            ref = torch.cdist(queries, keys).sort(dim=1).values[:, k - 1]
            torch.testing.assert_close(knn_distance(stats, z, k=k), ref, rtol=1e-5, atol=1e-5)
        assert list(bank_scores(stats, z, ("mahalanobis", "knn"), k=3)) == ["knn"]
    with pytest.raises(DataError, match="k must lie in"):
        knn_distance(stats, z, k=41)


def test_knn_without_a_bank_is_refused_before_any_work():
    no_bank = FeatureStats.empty(3).add_class("a", [torch.randn(10, 3)])
    with pytest.raises(DataError, match="needs a feature bank"):
        knn_distance(no_bank, torch.randn(4, 3))
    for make in (lambda: check_novelty_scores(("knn",), knn_bank=0),
                 lambda: ProtocolOptions(novelty_scores=("mahalanobis", "knn")),
                 lambda: RunConfig.from_dict({"continual": {"novelty_scores": ["knn"]}})):
        with pytest.raises(ConfigError, match="knn novelty score needs a feature bank.*knn.bank"):
            make()
    assert ProtocolOptions(novelty_scores=("knn",), knn_bank=100).knn_k == 10
    with pytest.raises(ConfigError, match="must not exceed"):
        ProtocolOptions(novelty_scores=("knn",), knn_bank=5, knn_k=10)


def test_head_scores_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(msp(logits), -torch.tensor([1 / (1 + np.exp(-2.0)), 0.5], dtype=torch.float64))
    torch.testing.assert_close(energy(logits), -torch.tensor([np.log(np.exp(2.0) + 1), np.log(2.0)],
                                                             dtype=torch.float64))
    assert list(head_scores(logits, ("mahalanobis", "energy", "msp"))) == ["energy", "msp"]


@pytest.mark.parametrize("score", sorted(NOVELTY_SCORES))
def test_every_score_flags_an_unseen_class(score):
    """Few nuisance coordinates: every score separates the unseen centre class from the seen corners. The head
    scores read the LDA scores as a linear head's logits (equal at the centre: low max-softmax, low energy)."""
    stats, z, unseen = _world(4, n=200, bank=100)
    clf = fit("lda", stats, MethodOptions(shrinkage=0.01))
    needs = NOVELTY_SCORES[score].needs
    values = (classifier_scores(clf, z, (score,)) if needs == "classifier" else
              bank_scores(stats, z, (score,), k=5) if needs == "bank" else head_scores(clf.scores(z), (score,)))
    assert auroc(values[score], unseen) > 0.85


def test_relative_mahalanobis_beats_the_plain_one_when_nuisance_dimensions_dominate():
    """Ren et al.'s failure case of the plain score: 48 coordinates of noise that seen and unseen classes share add a
    chi-square(48) term (sd ~10) to every class distance and bury the informative 2-D part. The background
    Gaussian has the same noise coordinates, so subtracting its distance cancels them."""
    stats, z, unseen = _world(48)
    for method in ("lda", "qda-shrink"):
        clf = fit(method, stats, MethodOptions(shrinkage=0.01))
        plain, relative = auroc(clf.novelty(z), unseen), auroc(clf.relative_novelty(z), unseen)
        assert plain < 0.8 and relative > 0.95, (method, plain, relative)
