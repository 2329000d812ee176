"""Images of random processes: seeded, uint8 in range, varied within and across images, every process used."""
import pytest
import torch

from cifarlab.config import RANDOM_PROCESSES
from cifarlab.data import synthetic
from cifarlab.data.synthetic import random_process_images
from cifarlab.errors import ConfigError


def test_the_same_seed_gives_the_same_images_and_another_seed_others():
    first = random_process_images(12, seed=3)
    assert first.shape == (12, 3, 32, 32) and first.dtype == torch.uint8
    assert torch.equal(first, random_process_images(12, seed=3))
    other = random_process_images(12, seed=4)
    assert (first != other).float().mean() > 0.9  # nearly every pixel differs: not one image shifted


@pytest.mark.parametrize("process", RANDOM_PROCESSES)
def test_each_process_draws_varied_images_over_the_whole_range(process):
    images = random_process_images(16, seed=0, size=24, processes=[process]).float()
    assert images.shape == (16, 3, 24, 24)
    assert images.std((1, 2, 3)).min() > 10  # no constant image (pixel values 0..255)
    assert images.amin() < 30 and images.amax() > 225
    flat = images.flatten(1)
    distances = torch.cdist(flat, flat) + torch.eye(16) * 1e9
    assert distances.min() > 100  # no two images alike


def test_processes_take_turns_and_leaves_are_flat_coloured():
    images = random_process_images(6, seed=1, processes=["dead_leaves", "spectral_noise"])
    alone = random_process_images(3, seed=1, processes=["dead_leaves"])
    assert torch.equal(images[0::2], alone)  # the first process's draws come first from the generator
    leaves, noise = images[0::2].long(), images[1::2].long()
    # A dead-leaves image is a handful of flat colours; 1/f noise changes colour at nearly every pixel.
    distinct = [len(torch.unique(image.flatten(1).T, dim=0)) for image in torch.cat([leaves, noise])]
    assert max(distinct[:3]) <= synthetic.SHAPES_PER_IMAGE + 1 < 200 < min(distinct[3:])


def test_the_spectrum_falls_with_frequency():
    fields = synthetic._power_law_fields(64, 1, 32, torch.Generator().manual_seed(0))
    power = torch.fft.fft2(fields).abs().square().mean((0, 1))  # (32, 32)
    assert power[1, 1] > 5 * power[4, 4] > 5 * power[16, 16]


@pytest.mark.parametrize("kwargs, words", [
    ({"count": 0}, "count must be a positive integer"),
    ({"count": 2, "processes": ["plasma"]}, "unknown random process 'plasma'; valid: dead_leaves"),
    ({"count": 2, "processes": []}, "at least one random process"),
])
def test_bad_arguments_are_named(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        random_process_images(seed=0, **kwargs)
