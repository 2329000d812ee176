"""Corruptions against references (SciPy's Gaussian filter, HSV by hand) and held-out class selection."""
import pytest
import scipy.ndimage
import torch

from cifarlab.data.sources import Split
from cifarlab.errors import ConfigError
from cifarlab.uncertainty.ood import (CORRUPTIONS, SEVERITIES, brightness, contrast, corrupt, gaussian_blur,
                                      gaussian_noise, held_out_classes, shot_noise)


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_every_corruption_keeps_shape_and_gets_stronger_with_severity(name):
    images = _images()
    errors = []
    for severity in SEVERITIES:
        out = corrupt(images, name, severity, generator=torch.Generator().manual_seed(1))
        assert out.dtype == torch.uint8 and out.shape == images.shape
        errors.append((out.float() - images.float()).pow(2).mean().item())
    assert errors[0] > 0 and errors == sorted(errors)


def test_gaussian_blur_matches_scipy():
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for severity, sigma in ((1, 0.4), (5, 1.0)):
        ours = gaussian_blur(x, severity)
        # scikit-image's gaussian (used by CIFAR-10-C) is SciPy's filter with mode "nearest", truncate 4
        reference = scipy.ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0)
        torch.testing.assert_close(ours, torch.from_numpy(reference))


def test_contrast_and_brightness_by_hand():
    x = torch.tensor([0.2, 0.6]).view(1, 1, 1, 2).expand(1, 3, 1, 2)  # mean 0.4 in every channel
    torch.testing.assert_close(contrast(x, 2), torch.tensor([0.3, 0.5]).view(1, 1, 1, 2).expand(1, 3, 1, 2))
    pixels = torch.tensor([[0.2, 0.4, 0.8], [0.5, 0.95, 0.1], [0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    # severity 2 adds 0.1 to V = max(r, g, b): (0.2, 0.4, 0.8) -> x 0.9/0.8; V 0.95 -> 1 (clipped); black -> grey
    expected = torch.tensor([[0.225, 0.45, 0.9], [0.5 / 0.95, 1.0, 0.1 / 0.95], [0.1, 0.1, 0.1]]).T.reshape(1, 3, 1, 3)
    torch.testing.assert_close(brightness(pixels, 2), expected)


def test_noise_statistics():
    grey = torch.full((64, 3, 16, 16), 0.5, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    assert (gaussian_noise(grey, 3, g) - grey).std().item() == pytest.approx(0.08, rel=0.02)
    shot = shot_noise(grey, 5, g)  # Poisson(0.5 * 50) / 50: mean 0.5, std sqrt(25) / 50 = 0.1
    assert shot.mean().item() == pytest.approx(0.5, abs=0.003)
    assert shot.std().item() == pytest.approx(0.1, rel=0.03)


def test_corrupt_is_reproducible_and_checks_its_input():
    images = _images()
    a = corrupt(images, "gaussian_noise", 3, generator=torch.Generator().manual_seed(5))
    b = corrupt(images, "gaussian_noise", 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="valid: gaussian_noise"):
        corrupt(images, "fog", 1)
    with pytest.raises(ConfigError, match="severity"):
        corrupt(images, "contrast", 6)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(images.float(), "contrast", 1)


def test_held_out_classes():
    split = Split(torch.arange(6).view(6, 1, 1, 1).expand(6, 3, 1, 1).to(torch.uint8), torch.tensor([0, 1, 2, 0, 3, 1]))
    out = held_out_classes(split, [0, 1])
    assert out.images[:, 0].flatten().tolist() == [2, 4] and out.labels.tolist() == [2, 3]
    assert held_out_classes(split, None) is None
    assert held_out_classes(split, [0, 1, 2, 3]) is None
