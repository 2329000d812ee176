"""Gaussian classifiers against slow obvious references (numpy solve, scipy logpdf) and hand cases."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from cifarlab.continual.classifiers import METHODS, MethodOptions, fit, oas_shrinkage
from cifarlab.continual.metrics import auroc
from cifarlab.continual.stats import FeatureStats
from cifarlab.errors import CifarlabError

D = 6


def _gaussian_classes(n_classes: int = 4, n: int = 80, seed: int = 0):
    """Classes with fixed means and one shared, correlated covariance; `seed` draws the examples."""
    world = torch.Generator().manual_seed(1234)
    mix, means = torch.randn(D, D, generator=world), torch.randn(n_classes, D, generator=world) * 3
    g = torch.Generator().manual_seed(seed)
    return {f"class{c}": torch.randn(n + 10 * c, D, generator=g) @ mix + means[c] for c in range(n_classes)}


def _stats(data) -> FeatureStats:
    stats = FeatureStats.empty(D)
    for name, x in data.items():
        stats = stats.add_class(name, x.split(32))
    return stats


def _reference_shared_cov(data, lam):
    xs = [x.double().numpy() for x in data.values()]
    cov = sum((x - x.mean(0)).T @ (x - x.mean(0)) for x in xs) / (sum(map(len, xs)) - len(xs))
    return (1 - lam) * cov + lam * np.trace(cov) / D * np.eye(D), np.stack([x.mean(0) for x in xs])


@pytest.mark.parametrize("lam,prior", [(0.0, "uniform"), (0.3, "empirical")])
def test_lda_scores_match_numpy_solve(lam, prior):
    data = _gaussian_classes()
    clf = fit("lda", _stats(data), MethodOptions(shrinkage=lam, prior=prior))
    cov, mu = _reference_shared_cov(data, lam)
    counts = np.array([len(x) for x in data.values()], dtype=float)
    log_prior = np.log(counts / counts.sum()) if prior == "empirical" else np.full(4, -math.log(4))
    w = np.linalg.solve(cov, mu.T).T               # w_c = Sigma^-1 mu_c
    b = 0.5 * np.einsum("cd,cd->c", mu, w)          # b_c = mu_c . Sigma^-1 mu_c / 2
    z = torch.randn(50, D, generator=torch.Generator().manual_seed(9)) * 4
    ref = z.double().numpy() @ w.T - b + log_prior
    np.testing.assert_allclose(clf.scores(z).numpy(), ref, rtol=1e-9, atol=1e-9)
    assert torch.equal(clf.predict(z), torch.from_numpy(ref.argmax(1)))
    diff = z.double().numpy()[:, None, :] - mu[None]  # (B, C, D)
    maha = np.einsum("bcd,bcd->bc", diff, np.linalg.solve(cov, diff[..., None])[..., 0])
    np.testing.assert_allclose(clf.mahalanobis(z).numpy(), maha, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(clf.novelty(z).numpy(), maha.min(1), rtol=1e-8, atol=1e-8)


def test_qda_shrink_scores_are_gaussian_log_likelihoods():
    data = _gaussian_classes()
    g = 0.4
    clf = fit("qda-shrink", _stats(data), MethodOptions(shrinkage=0.1, class_shrinkage=g))
    shared, mu = _reference_shared_cov(data, 0.1)
    z = torch.randn(30, D, generator=torch.Generator().manual_seed(3)) * 4
    ref = np.stack([multivariate_normal(mu[c], (1 - g) * np.cov(x.double().numpy(), rowvar=False) + g * shared)
                    .logpdf(z.double().numpy()) for c, x in enumerate(data.values())], axis=1) - math.log(4)
    got = clf.scores(z).numpy()
    # Equal up to the constant -D/2 log(2 pi) shared by all classes.
    np.testing.assert_allclose(got - got[:, :1], ref - ref[:, :1], rtol=1e-9, atol=1e-8)


def _two_class_hand_stats(offsets_1=((10, 0), (-10, 0), (0, 1), (0, -1))):
    """Class a around (0, 0), class b around (4, 1): within-class spread is 10x wider along x."""
    a = torch.tensor([[0.0, 0.0]]) + torch.tensor(offsets_1, dtype=torch.float32)
    b = torch.tensor([[4.0, 1.0]]) + torch.tensor(offsets_1, dtype=torch.float32)
    return FeatureStats.empty(2).add_class("a", [a]).add_class("b", [b])


def test_lda_and_ncm_disagree_where_the_covariance_matters():
    stats = _two_class_hand_stats()
    z = torch.tensor([[3.0, 0.2]])
    # Euclid: |z-a|^2 = 9.04 > |z-b|^2 = 1.64; Mahalanobis with Sigma = diag(66.7, 0.667): 0.195 < 0.975.
    assert fit("ncm", stats).predict(z).item() == 1
    assert fit("lda", stats, MethodOptions(shrinkage=0.0)).predict(z).item() == 0
    torch.testing.assert_close(fit("ncm", stats).mahalanobis(z), torch.tensor([[9.04, 1.64]], dtype=torch.float64))
    torch.testing.assert_close(fit("lda", stats, MethodOptions(shrinkage=0.0)).mahalanobis(z),
                               torch.tensor([[9 / (200 / 3) + 0.04 / (2 / 3), 1 / (200 / 3) + 0.64 / (2 / 3)]],
                                            dtype=torch.float64))


def test_empirical_prior_breaks_a_tie_toward_the_frequent_class():
    a = torch.tensor([[-1.0], [-3.0]])
    b = torch.tensor([[1.0], [3.0], [1.0], [3.0], [1.0], [3.0]])
    stats = FeatureStats.empty(1).add_class("a", [a + 0]).add_class("b", [b])  # means -2 and +2
    z = torch.tensor([[0.0]])  # equidistant
    scores = fit("lda", stats, MethodOptions(prior="uniform")).scores(z)
    assert scores[0, 0].item() == pytest.approx(scores[0, 1].item(), abs=1e-12)
    assert fit("lda", stats, MethodOptions(prior="empirical")).predict(z).item() == 1
    assert fit("lda", stats, MethodOptions(prior="empirical")).predict(torch.tensor([[-0.5]])).item() == 0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_separates_gaussians_and_flags_an_unseen_class(method):
    data = _gaussian_classes(n=200)
    del data["class3"]  # never learned
    stats = _stats(data)
    clf = fit(method, stats, MethodOptions(shrinkage=0.01))
    test = _gaussian_classes(n=50, seed=1)  # fresh examples of the same classes
    z = torch.cat([test[name][:50] for name in data])
    y = torch.arange(3).repeat_interleave(50)
    accuracy = (clf.predict(z) == y).double().mean().item()
    assert clf.scores(z).shape == (150, 3) and clf.classes == ("class0", "class1", "class2")
    scores = torch.cat([clf.novelty(z), clf.novelty(test["class3"])])
    novelty_auroc = auroc(scores, torch.arange(len(scores)) >= len(z))
    assert accuracy > 0.85 and novelty_auroc > 0.8


def test_slda_agrees_with_lda_on_enough_data():
    data = _gaussian_classes(n=300)
    stats = FeatureStats.empty(D)
    for name, x in data.items():
        stats = stats.add_class(name, x.split(128))
    z = torch.cat(list(data.values()))
    agree = (fit("slda", stats).predict(z) == fit("lda", stats).predict(z)).double().mean().item()
    assert agree > 0.97


def test_singular_covariance_without_shrinkage_is_a_clear_error_and_oas_fixes_it():
    g = torch.Generator().manual_seed(0)
    stats = FeatureStats.empty(20).add_class("a", [torch.randn(5, 20, generator=g)]) \
                                 .add_class("b", [torch.randn(5, 20, generator=g) + 1])  # N=10 < D=20
    with pytest.raises(CifarlabError, match="not positive definite .* raise the shrinkage"):
        fit("lda", stats, MethodOptions(shrinkage=0.0))
    assert fit("lda", stats, MethodOptions(shrinkage="oas")).predict(torch.zeros(1, 20)).shape == (1,)
    flat = FeatureStats.empty(3).add_class("a", [torch.ones(4, 3)]).add_class("b", [torch.zeros(4, 3)])
    with pytest.raises(CifarlabError, match="zero variance"):
        fit("lda", flat)


def test_oas_intensity():
    assert oas_shrinkage(torch.eye(4, dtype=torch.float64) * 3, 10) == 1.0  # already isotropic
    cov = torch.diag(torch.tensor([5.0, 1.0, 0.5, 0.1], dtype=torch.float64))
    lams = [oas_shrinkage(cov, n) for n in (5, 50, 5000)]
    assert 1 >= lams[0] > lams[1] > lams[2] > 0 and lams[2] < 0.01  # more data, less shrinkage


def test_bad_names_and_options_list_what_is_valid():
    with pytest.raises(CifarlabError, match="valid: lda, qda-shrink, ncm, slda"):
        fit("knn", _two_class_hand_stats())
    with pytest.raises(CifarlabError, match="no class learned"):
        fit("lda", FeatureStats.empty(3))
    with pytest.raises(CifarlabError, match="shrinkage must be"):
        MethodOptions(shrinkage=2.0)
    with pytest.raises(CifarlabError, match="valid: uniform, empirical"):
        MethodOptions(prior="flat")


def test_qda_shrink_fully_toward_the_shared_covariance_is_lda():
    stats = _stats(_gaussian_classes())
    z = torch.randn(40, D, generator=torch.Generator().manual_seed(4)) * 4
    qda = fit("qda-shrink", stats, MethodOptions(class_shrinkage=1.0))
    assert torch.equal(qda.predict(z), fit("lda", stats).predict(z))
    g = torch.Generator().manual_seed(0)
    few = FeatureStats.empty(20).add_class("a", [torch.randn(5, 20, generator=g)]) \
                                .add_class("b", [torch.randn(30, 20, generator=g)])  # class a: 5 examples in 20-D
    with pytest.raises(CifarlabError, match="class 'a' .* raise class_shrinkage"):
        fit("qda-shrink", few, MethodOptions(class_shrinkage=0.0))
