"""Sufficient statistics: exact, order independent, equal to numpy's mean/cov; SLDA stream = its loop."""
import numpy as np
import pytest
import torch

from cifarlab.continual.stats import (FeatureStats, batch_stats, empty_stream, merge, pooled_covariance,
                                      stream_update)
from cifarlab.errors import CifarlabError


def _class_data(seed: int, n: int = 60, d: int = 5, offset: float = 100.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # A large offset makes raw-moment covariance lose digits; the centred scatter must not.
    return torch.randn(n, d, generator=g) * (seed + 1) + offset


def test_batch_stats_match_numpy_mean_and_cov():
    x = _class_data(0, offset=1e4)  # raw moments would keep ~8 of 16 digits here
    s = batch_stats(x)
    xn = x.double().numpy()
    np.testing.assert_allclose(s.mean.numpy(), xn.mean(0), rtol=1e-14, atol=0)
    np.testing.assert_allclose(s.covariance().numpy(), np.cov(xn, rowvar=False), rtol=0, atol=1e-10)
    raw = (xn.T @ xn - len(xn) * np.outer(xn.mean(0), xn.mean(0))) / (len(xn) - 1)
    assert np.abs(raw - np.cov(xn, rowvar=False)).max() > 1e-8  # the cancellation the centred form avoids
    assert s.count == 60 and s.sum.dtype == torch.float64


def test_merging_batches_in_any_order_is_exact():
    x = _class_data(1, n=97)
    whole = batch_stats(x)
    for seed in range(3):
        perm = torch.randperm(97, generator=torch.Generator().manual_seed(seed))
        batches = x[perm].split([13, 40, 1, 43])
        merged = batch_stats(batches[0])
        for b in batches[1:]:
            merged = merge(merged, batch_stats(b))
        assert merged.count == whole.count
        torch.testing.assert_close(merged.sum, whole.sum, rtol=0, atol=1e-10)
        torch.testing.assert_close(merged.scatter, whole.scatter, rtol=1e-12, atol=1e-10)


def test_class_order_does_not_change_per_class_or_pooled_statistics():
    data = {f"c{i}": _class_data(i) for i in range(4)}
    fwd, bwd = FeatureStats.empty(5), FeatureStats.empty(5)
    for name in data:
        fwd = fwd.add_class(name, data[name].split(7))
    for name in reversed(data):
        bwd = bwd.add_class(name, data[name].split(25))
    for name in data:
        a, b = fwd.per_class[fwd.classes.index(name)], bwd.per_class[bwd.classes.index(name)]
        torch.testing.assert_close(a.scatter, b.scatter, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(a.sum, b.sum, rtol=0, atol=1e-10)
    torch.testing.assert_close(pooled_covariance(fwd.per_class), pooled_covariance(bwd.per_class),
                               rtol=1e-12, atol=1e-10)
    # Pooled covariance = (sum of centred scatters) / (N - C), computed the obvious way.
    xs = [data[k].double().numpy() for k in data]
    ref = sum((x - x.mean(0)).T @ (x - x.mean(0)) for x in xs) / (sum(len(x) for x in xs) - len(xs))
    np.testing.assert_allclose(pooled_covariance(fwd.per_class).numpy(), ref, rtol=1e-12, atol=1e-10)


def _slda_loop(rows_by_class, dim):
    """Deep SLDA's update written literally, one example at a time."""
    sigma, t, mu, n = np.zeros((dim, dim)), 0, {}, {}
    for y, rows in rows_by_class:
        for z in rows.double().numpy():
            d = np.zeros(dim) if n.get(y, 0) == 0 else z - mu[y]
            sigma = (t * sigma + t / (t + 1) * np.outer(d, d)) / (t + 1)
            mu[y] = z if n.get(y, 0) == 0 else mu[y] + (z - mu[y]) / (n[y] + 1)
            n[y] = n.get(y, 0) + 1
            t += 1
    return sigma, t


def test_stream_update_equals_one_example_at_a_time_loop():
    a, b = _class_data(0, n=30, offset=1.0), _class_data(1, n=20, offset=-2.0)
    stats = FeatureStats.empty(5).add_class("a", a.split(7)).add_class("b", [b])
    sigma, t = _slda_loop([("a", a), ("b", b)], 5)
    assert stats.stream.updates == t == 50
    np.testing.assert_allclose(stats.stream.covariance().numpy(), sigma, rtol=1e-10, atol=1e-12)
    # Chunking inside one call does not change the result either.
    chunked = stream_update(empty_stream(5), None, a, chunk=4)
    np.testing.assert_allclose(chunked.covariance().numpy(), _slda_loop([("a", a)], 5)[0], rtol=1e-10, atol=1e-12)


def test_add_class_returns_new_object_and_leaves_the_old_untouched():
    s0 = FeatureStats.empty(5).add_class("a", [_class_data(0)])
    before = s0.per_class[0].scatter.clone()
    s1 = s0.add_class("b", [_class_data(1)])
    assert s0.classes == ("a",) and s1.classes == ("a", "b")
    assert torch.equal(s0.per_class[0].scatter, before)


@pytest.mark.parametrize("features,match", [
    ([torch.zeros(0, 5)], "empty class"),
    ([], "empty class"),
    ([torch.full((3, 5), float("nan"))], "NaN or Inf"),
    ([torch.ones(3, 5), torch.tensor([[1.0, 2, float("inf"), 4, 5]])], "NaN or Inf"),
    ([torch.ones(3, 4)], "dimension 4"),
    ([torch.ones(5)], "2-D"),
])
def test_bad_features_are_rejected_with_a_clear_error(features, match):
    s = FeatureStats.empty(5).add_class("a", [_class_data(0)])
    with pytest.raises(CifarlabError, match=match):
        s.add_class("b", features)
    assert s.classes == ("a",)


def test_relearning_a_class_is_an_error():
    s = FeatureStats.empty(5).add_class("cat", [_class_data(0)])
    with pytest.raises(CifarlabError, match="'cat' is already learned"):
        s.add_class("cat", [_class_data(1)])


def test_the_background_of_all_classes_is_the_statistics_of_all_their_features_together():
    data = {f"c{i}": _class_data(i, n=40 + 7 * i, offset=10.0 * i) for i in range(3)}
    stats = FeatureStats.empty(5)
    for name, x in data.items():
        stats = stats.add_class(name, x.split(16))  # one class at a time, in batches: nothing old is revisited
    everything = batch_stats(torch.cat(list(data.values())))
    background = stats.background()
    assert background.count == everything.count
    np.testing.assert_allclose(background.mean.numpy(), everything.mean.numpy(), rtol=1e-13)
    np.testing.assert_allclose(background.scatter.numpy(), everything.scatter.numpy(), rtol=1e-11)
    with pytest.raises(CifarlabError, match="no class learned"):
        FeatureStats.empty(5).background()


def test_the_feature_bank_keeps_evenly_spaced_rows_whatever_the_batching():
    x = _class_data(0, n=50)
    for batches in (x.split(50), x.split(7), x.split(1)):
        stats = FeatureStats.empty(5, bank_size=10).add_class("a", batches).add_class("b", [x[:4]])
        assert torch.equal(stats.bank[0], x[::5].float()) and torch.equal(stats.bank[1], x[:4].float())
    assert FeatureStats.empty(5).add_class("a", [x]).bank == ()  # off by default
    with pytest.raises(CifarlabError, match="bank_size must be >= 0"):
        FeatureStats.empty(5, bank_size=-1)
