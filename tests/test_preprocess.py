"""Preprocessing: statistics against direct float64 references, whitening, GCN, state round trip, errors."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cifarlab.data.preprocess import (
    PREPROCESSORS,
    Preprocessor,
    fit_preprocessor,
    global_contrast_normalize,
    to_float,
    to_uint8,
)
from cifarlab.errors import CheckpointError, ConfigError, DataError

def _images(n: int = 200, size: int = 8, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, size, size) images with correlated pixels and different statistics per channel."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 4, size // 4, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    noise = 0.08 * torch.randn(n, 3, size, size, generator=g)
    channel_scale = torch.tensor([1.0, 0.6, 0.3]).view(1, 3, 1, 1)
    return (255 * (smooth * channel_scale + noise + 0.2)).clamp(0, 255).to(torch.uint8)


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


def test_normalize_gives_zero_mean_unit_std_per_channel():
    images = _images()
    y = fit_preprocessor("normalize", images, batch_size=7)(_as_float(images)).double()
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    std = y.std(dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(std, torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)


def test_streaming_over_chunks_matches_one_pass():
    images = _images()
    for kind in ("normalize", "zca"):
        small, whole = fit_preprocessor(kind, images, batch_size=64), fit_preprocessor(kind, images, batch_size=10**6)
        for name, value in small.state().items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, whole.state()[name], atol=1e-6, rtol=1e-5)


def test_mean_subtracts_the_per_pixel_mean_image():
    images = _images()
    x = _as_float(images)
    y = fit_preprocessor("mean", images)(x)
    torch.testing.assert_close(y, x - images.double().div(255).mean(0).float(), atol=1e-6, rtol=0)


def _covariance(y: torch.Tensor) -> torch.Tensor:
    flat = y.double().flatten(1)
    flat = flat - flat.mean(0)
    return flat.T @ flat / len(flat)


def test_zca_whitened_training_data_has_identity_covariance():
    images = _images(n=2000)  # 192 features, full rank thanks to the pixel noise
    y = fit_preprocessor("zca", images, zca_epsilon=1e-7)(_as_float(images))
    torch.testing.assert_close(_covariance(y), torch.eye(192, dtype=torch.float64), atol=2e-3, rtol=0)


def test_zca_matrix_matches_numpy_reference():
    images = _images()
    eps = 0.05
    flat = images.numpy().reshape(len(images), -1).astype(np.float64) / 255
    s, u = np.linalg.eigh(np.cov(flat, rowvar=False, bias=True))
    expected = u @ np.diag(1 / np.sqrt(s.clip(0) + eps)) @ u.T
    whiten = fit_preprocessor("zca", images, zca_epsilon=eps).state()["whiten"]
    np.testing.assert_allclose(whiten.numpy(), expected, atol=1e-5)


def test_gcn_gives_each_image_zero_mean_unit_std_and_floors_flat_images():
    x = _as_float(_images(n=10))
    x[0] = 0.5  # constant image: std 0
    y = global_contrast_normalize(x, min_std=0.01)
    torch.testing.assert_close(y.mean(dim=(1, 2, 3)), torch.zeros(10), atol=1e-6, rtol=0)
    torch.testing.assert_close(y[1:].std(dim=(1, 2, 3), correction=0), torch.ones(9), atol=1e-5, rtol=0)
    assert torch.equal(y[0], torch.zeros_like(y[0]))


def test_gcn_zca_applies_gcn_then_whitens_the_gcn_images():
    images = _images(n=2000)
    pre = fit_preprocessor("gcn_zca", images, zca_epsilon=1e-7)
    y = pre(_as_float(images))
    # GCN removes each image's mean, so the whitened covariance is a projection: identity minus one direction.
    eigenvalues = torch.linalg.eigvalsh(_covariance(y))
    assert eigenvalues[0].abs() < 1e-3  # float32 rounding of the per-image mean, times 1/sqrt(eps)
    torch.testing.assert_close(eigenvalues[1:], torch.ones(191, dtype=torch.float64), atol=2e-3, rtol=0)
    gcn = global_contrast_normalize(images.double() / 255)
    torch.testing.assert_close(pre.state()["mean"], gcn.mean(0).float(), atol=1e-6, rtol=0)


def test_fit_uses_only_the_images_passed_and_does_not_modify_them():
    train, test = _images(n=100, seed=0), _images(n=100, seed=1) // 2
    before = train.clone()
    fitted = fit_preprocessor("normalize", train)
    assert torch.equal(train, before)
    torch.testing.assert_close(fitted.state()["mean"].flatten(), train.double().div(255).mean(dim=(0, 2, 3)).float())
    both = fit_preprocessor("normalize", torch.cat([train, test]))
    assert not torch.allclose(fitted.state()["mean"], both.state()["mean"], atol=1e-3)
    # The fitted module is independent of later data: applying it to test images leaves its buffers alone.
    fitted(_as_float(test))
    torch.testing.assert_close(fitted.state()["mean"], fit_preprocessor("normalize", train).state()["mean"])


@pytest.fixture(scope="module")
def fitted_by_kind() -> dict[str, Preprocessor]:
    return {kind: fit_preprocessor(kind, _images(), zca_epsilon=0.05) for kind in PREPROCESSORS}


@pytest.mark.parametrize("kind", PREPROCESSORS)
def test_state_round_trips_through_torch_save_weights_only(kind, fitted_by_kind):
    fitted = fitted_by_kind[kind]
    buffer = io.BytesIO()
    torch.save(fitted.state(), buffer)
    buffer.seek(0)
    rebuilt = Preprocessor.from_state(torch.load(buffer, weights_only=True))
    assert rebuilt.kind == kind
    x = _as_float(_images(n=16, seed=1))
    assert torch.equal(rebuilt(x), fitted(x))


@pytest.mark.parametrize("kind", PREPROCESSORS)
def test_forward_keeps_shape_and_dtype(kind, fitted_by_kind):
    for dtype in (torch.float32, torch.float64):
        x = _as_float(_images(n=4)).to(dtype)
        y = fitted_by_kind[kind](x)
        assert y.shape == x.shape and y.dtype == dtype


@pytest.mark.parametrize("kind", PREPROCESSORS)
def test_from_uint8_scales_to_unit_range_then_preprocesses(kind, fitted_by_kind):
    images = _images(n=4)
    kept = images.clone()
    torch.testing.assert_close(fitted_by_kind[kind].from_uint8(images), fitted_by_kind[kind](_as_float(images)))
    assert torch.equal(images, kept)


def test_none_is_identity():
    x = _as_float(_images(n=4))
    assert torch.equal(fit_preprocessor("none", _images())(x), x)


def test_resize_comes_after_normalisation_and_only_when_the_size_differs():
    images = _images(n=6, size=16)
    x = _as_float(images)
    plain = fit_preprocessor("normalize", images)(x)
    assert torch.equal(fit_preprocessor("normalize", images, size=16)(x), plain)  # the stored size: no resize
    up = fit_preprocessor("normalize", images, size=64)(x)
    assert up.shape == (6, 3, 64, 64)
    torch.testing.assert_close(up, F.interpolate(plain, size=(64, 64), mode="bilinear", align_corners=False))
    down = fit_preprocessor("normalize", images, size=8)(x)
    assert down.shape == (6, 3, 8, 8)
    torch.testing.assert_close(down, F.interpolate(plain, size=(8, 8), mode="bilinear", antialias=True,
                                                   align_corners=False))
    # antialiasing averages the 4x4 neighbourhood instead of sampling 2 pixels: smoother than plain bilinear
    aliased = F.interpolate(plain, size=(8, 8), mode="bilinear", align_corners=False)
    assert down.std() < aliased.std()
    # ZCA is fitted at the stored resolution, so it runs there and the resize follows
    zca = fit_preprocessor("zca", images, size=24)
    torch.testing.assert_close(zca(x), F.interpolate(fit_preprocessor("zca", images)(x), size=(24, 24),
                                                     mode="bilinear", align_corners=False))


def test_input_size_is_saved_and_old_states_without_it_do_not_resize():
    images = _images(n=20, size=16)
    fitted = fit_preprocessor("normalize", images, size=32)
    buffer = io.BytesIO()
    torch.save(fitted.state(), buffer)
    buffer.seek(0)
    rebuilt = Preprocessor.from_state(torch.load(buffer, weights_only=True))
    assert rebuilt.size == 32 and rebuilt(_as_float(images)).shape == (20, 3, 32, 32)
    old = {key: value for key, value in fitted.state().items() if key != "size"}  # written before input_size
    assert Preprocessor.from_state(old).size is None
    for size in (4, 0, 8.0, True, "64"):
        with pytest.raises(ConfigError, match=f"input size must be an integer >= 8 .*got {size!r}"):
            fit_preprocessor("normalize", images, size=size)
    with pytest.raises(CheckpointError, match="damaged preprocessor state: input size"):
        Preprocessor.from_state({**fitted.state(), "size": 2})


def test_unknown_kind_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="normalize, mean, zca, gcn_zca, none"):
        fit_preprocessor("whiten", _images())
    with pytest.raises(ConfigError, match="unknown preprocessor 'whiten'"):
        Preprocessor("whiten")


def test_bad_inputs_are_rejected():
    with pytest.raises(DataError, match="uint8"):
        fit_preprocessor("normalize", _as_float(_images()))
    with pytest.raises(ConfigError, match="zca_epsilon"):
        fit_preprocessor("zca", _images(), zca_epsilon=0)
    with pytest.raises(DataError, match="std is zero"):
        fit_preprocessor("normalize", torch.full((4, 3, 2, 2), 7, dtype=torch.uint8))
    with pytest.raises(CheckpointError, match="lacks tensors"):
        Preprocessor.from_state({"kind": "zca", "gcn_min_std": 0.01, "mean": torch.zeros(3, 8, 8)})
    with pytest.raises(CheckpointError, match="not a preprocessor state"):
        Preprocessor.from_state({"kind": "sharpen", "gcn_min_std": 0.01})


def test_normalize_on_real_cifar10_matches_the_known_channel_statistics(jpeg_root: Path):
    from PIL import Image

    files = [path for folder in sorted((jpeg_root / "train").iterdir()) for path in sorted(folder.iterdir())[:30]]
    images = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])).permute(0, 3, 1, 2)
    state = fit_preprocessor("normalize", images.contiguous()).state()
    # Full training set: mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616); 300 images land near them.
    torch.testing.assert_close(state["mean"].flatten(), torch.tensor([0.4914, 0.4822, 0.4465]), atol=0.04, rtol=0)
    torch.testing.assert_close(state["std"].flatten(), torch.tensor([0.2470, 0.2435, 0.2616]), atol=0.03, rtol=0)


def test_uint8_float_round_trip_is_exact_and_copies():
    images = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = to_float(images)
    assert x.dtype == torch.float32 and x.min() == 0 and x.max() == 1
    assert torch.equal(to_uint8(x), images)
    assert torch.equal(to_uint8(torch.tensor([-0.1, 0.0019, 0.002, 1.2])), torch.tensor([0, 0, 1, 255], dtype=torch.uint8))
    same = torch.rand(2, 3)
    assert to_float(same) is not same
