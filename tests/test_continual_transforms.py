"""Feature transforms: their properties, and that statistics and classifiers apply them alike."""
import pytest
import torch

from cifarlab import config
from cifarlab.continual.classifiers import fit
from cifarlab.continual.stats import FeatureStats, batch_stats
from cifarlab.continual.transforms import TRANSFORMS, apply_transform, l2_normalize, tukey_power
from cifarlab.errors import ConfigError


def _features(n: int = 50, d: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g) * 10).double()  # norms of 0 to ~30


def test_the_names_in_config_are_the_registry():
    assert tuple(TRANSFORMS) == config.FEATURE_TRANSFORMS
    with pytest.raises(ConfigError, match="valid: none, l2, tukey, tukey\\+l2"):
        apply_transform("pca", _features())


def test_l2_rows_have_norm_one_and_zero_rows_stay_zero():
    x = torch.cat([_features(), torch.zeros(1, 7, dtype=torch.float64)])
    y = l2_normalize(x)
    torch.testing.assert_close(y[:-1].norm(dim=1), torch.ones(50, dtype=torch.float64))
    assert torch.equal(y[-1], torch.zeros(7, dtype=torch.float64))
    torch.testing.assert_close(l2_normalize(y), y)  # idempotent
    torch.testing.assert_close(apply_transform("tukey+l2", x)[:-1].norm(dim=1), torch.ones(50, dtype=torch.float64))


def test_tukey_is_the_square_root_on_non_negative_features_and_monotone_everywhere():
    relu = _features().clamp(min=0)  # post-ReLU features
    torch.testing.assert_close(tukey_power(relu), relu.sqrt())
    line = torch.linspace(-9, 9, 181, dtype=torch.float64).unsqueeze(0)  # one row, sorted, both signs
    mapped = tukey_power(line)[0]
    assert bool((mapped[1:] > mapped[:-1]).all())  # strictly increasing: order and ties kept
    torch.testing.assert_close(tukey_power(-line), -tukey_power(line))  # sign(x) |x|^0.5 for negative values
    assert tukey_power(torch.tensor([[-4.0, 0.0, 9.0]])).tolist() == [[-2.0, 0.0, 3.0]]


def test_none_changes_nothing_and_no_transform_modifies_its_input():
    x = _features()
    before = x.clone()
    for name in TRANSFORMS:
        apply_transform(name, x)
    assert torch.equal(x, before) and torch.equal(apply_transform("none", x), x)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_statistics_and_classifiers_apply_the_transform_to_what_they_are_given(name):
    """Learning raw features with a transform = learning the transformed features with none; the classifier then
    takes raw features and transforms them itself, so fitting, classifying and scoring all see one space."""
    a, b, z = _features(seed=1).abs(), _features(seed=2).abs() + 3, _features(n=20, seed=3).abs() + 1
    stats = FeatureStats.empty(7, transform=name).add_class("a", a.split(16)).add_class("b", [b])
    plain = FeatureStats.empty(7).add_class("a", apply_transform(name, a).split(16)).add_class(
        "b", [apply_transform(name, b)])
    ref = batch_stats(apply_transform(name, b))
    torch.testing.assert_close(stats.per_class[1].sum, ref.sum)
    torch.testing.assert_close(stats.per_class[1].scatter, ref.scatter)
    for method in ("lda", "qda-shrink"):
        clf, ref_clf = fit(method, stats), fit(method, plain)
        assert clf.transform == name
        zt = apply_transform(name, z)
        torch.testing.assert_close(clf.mahalanobis(z), ref_clf.mahalanobis(zt))
        torch.testing.assert_close(clf.scores(z), ref_clf.scores(zt))
        torch.testing.assert_close(clf.relative_novelty(z), ref_clf.relative_novelty(zt))
    with pytest.raises(ConfigError, match="unknown feature transform"):
        FeatureStats.empty(7, transform="sqrt")
