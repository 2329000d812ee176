"""Batched augmentation against slow per-image references; shapes, dtypes, seeds and argument errors."""

import pytest
import torch
import torch.nn.functional as F

from cifarlab.data.augment import (
    Augment,
    _sample_centres,
    _sample_offsets,
    color_jitter,
    cutout,
    grayscale,
    random_crop,
    random_flip,
    random_grayscale,
    random_resized_crop,
    random_translate,
)
from cifarlab.errors import ConfigError

DTYPES = (torch.uint8, torch.float32)


def _batch(dtype: torch.dtype, n: int = 64, size: tuple[int, int] = (8, 10)) -> torch.Tensor:
    """Distinct positive pixel values, so any misplaced or zeroed pixel shows."""
    x = torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(0))
    return (1 + 254 * x).to(torch.uint8) if dtype == torch.uint8 else 0.01 + x


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "transform",
    [
        lambda x, g: random_crop(x, 3, generator=g),
        lambda x, g: random_crop(x, 3, mode="reflect", generator=g),
        lambda x, g: random_translate(x, 2, generator=g),
        lambda x, g: random_flip(x, generator=g),
        lambda x, g: cutout(x, 4, generator=g),
        Augment(crop_padding=2, pad_mode="reflect", translate=1, flip=True, cutout=3),
    ],
    ids=["crop", "crop_reflect", "translate", "flip", "cutout", "augment"],
)
def test_shape_and_dtype_are_preserved_and_input_untouched(transform, dtype):
    x = _batch(dtype)
    before = x.clone()
    y = transform(x, _seeded())
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(x, before)
    assert not torch.equal(y, x)


def test_crop_with_padding_zero_is_identity():
    x = _batch(torch.float32)
    assert torch.equal(random_crop(x, 0, generator=_seeded()), x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["zero", "reflect"])
def test_crop_matches_per_image_pad_then_slice(mode, dtype):
    x, padding = _batch(dtype), 3
    y = random_crop(x, padding, mode=mode, generator=_seeded())
    offsets = _sample_offsets(x, padding, generator=_seeded())  # the same draws as inside random_crop
    assert offsets.min() == 0 and offsets.max() == 2 * padding  # 128 draws cover the whole range
    padded = F.pad(x.float(), (padding,) * 4, mode="constant" if mode == "zero" else "reflect").to(dtype)
    h, w = x.shape[-2:]
    for i, (top, left) in enumerate(offsets.tolist()):
        assert torch.equal(y[i], padded[i, :, top : top + h, left : left + w])


def test_translate_shifts_each_image_with_zero_fill():
    x, k = _batch(torch.float32), 2
    y = random_translate(x, k, generator=_seeded())
    shifts = _sample_offsets(x, k, generator=_seeded()) - k  # output pixel (r, c) reads input (r + dy, c + dx)
    h, w = x.shape[-2:]
    for i, (dy, dx) in enumerate(shifts.tolist()):
        expected = torch.zeros_like(x[i])
        expected[:, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = x[
            i, :, max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)
        ]
        assert torch.equal(y[i], expected)


def test_flip_flips_about_half_and_nothing_else():
    x = _batch(torch.float32, n=2000)
    y = random_flip(x, generator=_seeded())
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    kept = (y == x).flatten(1).all(1)
    assert torch.all(flipped ^ kept)
    assert 0.45 < flipped.float().mean() < 0.55  # 2000 fair coins: sd 0.011


@pytest.mark.parametrize("size", [4, 5])
def test_cutout_zeroes_the_clipped_square_around_each_centre(size):
    x = _batch(torch.float32, n=256, size=(16, 16))
    y = cutout(x, size, generator=_seeded())
    centres = _sample_centres(x, generator=_seeded())
    interior = 0
    for i, (row, col) in enumerate(centres.tolist()):
        top, left = row - size // 2, col - size // 2
        expected = x[i].clone()
        expected[:, max(0, top) : top + size, max(0, left) : left + size] = 0
        assert torch.equal(y[i], expected)
        if top >= 0 and left >= 0 and top + size <= 16 and left + size <= 16:
            interior += 1
            assert torch.equal((y[i] == 0).sum(dim=(1, 2)), torch.full((3,), size * size))
    assert interior > 100


def test_cutout_larger_than_the_image_blanks_it():
    x = _batch(torch.uint8)
    assert torch.equal(cutout(x, 100, generator=_seeded()), torch.zeros_like(x))


def test_augment_applies_crop_translate_flip_cutout_in_order():
    x = _batch(torch.float32)
    augment = Augment(crop_padding=2, pad_mode="reflect", translate=1, flip=True, cutout=3)
    g = _seeded()
    expected = random_crop(x, 2, mode="reflect", generator=g)
    expected = random_translate(expected, 1, generator=g)
    expected = cutout(random_flip(expected, generator=g), 3, generator=g)
    assert torch.equal(augment(x, _seeded()), expected)


def test_same_seed_same_output_and_different_seed_differs():
    x = _batch(torch.float32)
    augment = Augment(crop_padding=4, flip=True, cutout=4)
    assert torch.equal(augment(x, _seeded(7)), augment(x, _seeded(7)))
    assert not torch.equal(augment(x, _seeded(7)), augment(x, _seeded(8)))


def test_is_identity():
    assert Augment().is_identity
    assert Augment(pad_mode="reflect").is_identity
    assert not Augment(flip=True).is_identity
    assert not Augment(cutout=1).is_identity


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"crop_padding": -1}, "augment.crop_padding must be an integer >= 0"),
        ({"translate": 1.5}, "augment.translate must be an integer >= 0"),
        ({"cutout": -2}, "augment.cutout must be an integer >= 0"),
        ({"pad_mode": "mirror"}, "augment.pad_mode must be one of zero, reflect, got 'mirror'"),
        ({"flip": "yes"}, "augment.flip must be true or false"),
    ],
)
def test_augment_rejects_bad_fields(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Augment(**kwargs)


def test_functions_reject_bad_arguments():
    x = _batch(torch.float32)
    with pytest.raises(ConfigError, match="padding must be an integer >= 0"):
        random_crop(x, -1, generator=_seeded())
    with pytest.raises(ConfigError, match="mode must be one of zero, reflect"):
        random_crop(x, 2, mode="wrap", generator=_seeded())
    with pytest.raises(ConfigError, match="reflect padding must be < image size"):
        random_crop(x, 8, mode="reflect", generator=_seeded())
    with pytest.raises(ConfigError, match="size must be an integer >= 0"):
        cutout(x, -3, generator=_seeded())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_batch_device_with_a_device_generator():
    x = _batch(torch.float32).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    y = Augment(crop_padding=4, flip=True, cutout=4)(x, g)
    assert y.device == x.device and y.shape == x.shape


# --- contrastive views ---------------------------------------------------------------------------------------------


def test_resized_crop_of_the_whole_image_is_the_image_and_a_small_one_magnifies():
    x = _batch(torch.float32, n=8, size=(16, 16))
    whole = random_resized_crop(x, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=_seeded())
    torch.testing.assert_close(whole, x)  # bilinear sampling at the pixel centres of the full square
    ramp = torch.arange(16.0).expand(4, 3, 16, 16)  # columns 0..15
    crop = random_resized_crop(ramp, scale=(0.25, 0.25), ratio=(1.0, 1.0), generator=_seeded())
    steps = crop[..., 1:] - crop[..., :-1]
    torch.testing.assert_close(steps[..., 1:-1], torch.full_like(steps[..., 1:-1], 0.5))  # half-size window: 2x zoom
    assert crop.shape == ramp.shape and 0 <= crop.min() and crop.max() <= 15


def test_color_jitter_keeps_the_range_and_jitters_only_the_chosen_images():
    x = _batch(torch.float32, n=200).clamp(max=1)
    kept = color_jitter(x, strength=0.5, p=0.0, generator=_seeded())
    assert torch.equal(kept, x)
    jittered = color_jitter(x, strength=0.5, p=0.8, generator=_seeded())
    changed = (jittered != x).flatten(1).any(1).float().mean()
    assert 0.7 < changed < 0.9 and 0 <= jittered.min() and jittered.max() <= 1
    grey = x[:, :1].expand_as(x).clone()  # a grey image has no saturation to change
    torch.testing.assert_close(grayscale(grey), grey[:, :1])


def test_random_grayscale_turns_about_p_of_the_images_grey():
    x = _batch(torch.float32, n=400)
    out = random_grayscale(x, p=0.25, generator=_seeded())
    grey = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    assert 0.18 < grey.float().mean() < 0.32
    torch.testing.assert_close(out[grey][:, 0], (0.299 * x[grey][:, 0] + 0.587 * x[grey][:, 1] + 0.114 * x[grey][:, 2]))
    assert torch.equal(out[~grey], x[~grey])


def test_alternate_flip_mirrors_the_images_the_mask_names_and_at_random_without_it():
    x = _batch(torch.float32, n=6)
    augment = Augment(flip=True, alternate_flip=True)
    which = torch.tensor([True, False, False, True, True, False])
    y = augment(x, _seeded(), which)
    assert torch.equal(y[which], x[which].flip(-1)) and torch.equal(y[~which], x[~which])
    assert torch.equal(augment(x, _seeded(3)), Augment(flip=True)(x, _seeded(3)))  # as in a loader's first epoch
    with pytest.raises(ConfigError, match="alternate_flip needs flip"):
        Augment(alternate_flip=True)
