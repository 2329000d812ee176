"""BatchLoader: alternating (derandomized) flips, per example and per epoch, with views and under a seed."""

import pytest
import torch

from cifarlab.config import DataConfig
from cifarlab.data.augment import Augment
from cifarlab.data.loader import BatchLoader, augment_from_config, select_classes
from cifarlab.data.preprocess import fit_preprocessor
from cifarlab.data.sources import Dataset, Split
from cifarlab.errors import ConfigError


def _asymmetric_images(n: int) -> torch.Tensor:
    """uint8 images whose mirror image differs from them: each pixel row counts up from left to right."""
    ramp = torch.arange(8, dtype=torch.uint8).expand(n, 3, 8, 8)
    return ramp + torch.arange(n, dtype=torch.uint8)[:, None, None, None] * 8  # distinct images


def _loader(n: int = 40, *, alternate: bool = True, views: int = 1, flip_seed: int = 0) -> BatchLoader:
    images = _asymmetric_images(n)
    return BatchLoader(Split(images, torch.arange(n)), batch_size=7, preprocess=fit_preprocessor("none", images),
                       augment=Augment(flip=True, alternate_flip=alternate), sampling="shuffle", views=views,
                       flip_seed=flip_seed)


def _mirrored(loader: BatchLoader, epoch: int, seed: int = 0) -> torch.Tensor:
    """For every (example, view): was it mirrored in this epoch? (N, views) bool, whatever the batch order."""
    originals = loader.images.float() / 255
    result = torch.zeros(loader.num_examples, loader.views, dtype=torch.bool)
    seen = torch.zeros(loader.num_examples, dtype=torch.long)
    for x, y in loader.batches(torch.Generator().manual_seed(seed), epoch):
        for row, label in zip(x, y.tolist()):
            if torch.equal(row, originals[label]):
                mirrored = False
            else:
                assert torch.equal(row, originals[label].flip(-1)), "a row is neither the image nor its mirror"
                mirrored = True
            result[label, seen[label]] = mirrored
            seen[label] += 1
    assert torch.all(seen == loader.views)
    return result


def test_alternating_flips_mirror_each_image_in_every_other_epoch():
    loader = _loader()
    epochs = [_mirrored(loader, epoch, seed=epoch)[:, 0] for epoch in range(4)]
    assert 0.2 < epochs[0].float().mean() < 0.8  # a random half to start with (40 fair coins)
    for before, after in zip(epochs, epochs[1:]):
        assert torch.equal(after, ~before)  # the shuffle order does not matter


def test_random_flips_do_not_alternate():
    loader = _loader(alternate=False)
    first, second = _mirrored(loader, 0, seed=0)[:, 0], _mirrored(loader, 1, seed=1)[:, 0]
    assert not torch.equal(second, ~first)


def test_alternating_flips_show_two_views_of_an_image_once_each_way():
    mirrored = _mirrored(_loader(views=2), epoch=3)
    assert torch.all(mirrored[:, 0] != mirrored[:, 1])


def test_the_flip_seed_draws_the_first_half():
    assert torch.equal(_loader(flip_seed=5).flip_parity, _loader(flip_seed=5).flip_parity)
    assert not torch.equal(_loader(flip_seed=5).flip_parity, _loader(flip_seed=6).flip_parity)
    assert _loader(alternate=False).flip_parity is None


def test_data_config_alternate_flip_needs_flip():
    with pytest.raises(ConfigError, match="data.alternate_flip .* needs data.flip"):
        DataConfig(flip=False, alternate_flip=True).validate()
    assert augment_from_config(DataConfig(alternate_flip=True)).alternate_flip


def test_replace_keeps_every_setting_it_is_not_given_and_the_flip_pattern():
    loader = _loader(views=2, flip_seed=3)
    derived = loader.replace(sampling="poisson", views=1)
    assert (derived.sampling, derived.views) == ("poisson", 1)
    assert (derived.batch_size, derived.preprocess, derived.augment, derived.drop_last, derived.flip_seed) == (
        loader.batch_size, loader.preprocess, loader.augment, loader.drop_last, 3)
    assert torch.equal(derived.flip_parity, loader.flip_parity) and derived.images is loader.images
    other = Split(loader.images[:10], loader.labels[:10])
    assert loader.replace(other).num_examples == 10
    with pytest.raises(ConfigError, match="empty split"):  # an empty split is refused, not swapped for the images
        loader.replace(Split(loader.images[:0], loader.labels[:0]))


@pytest.mark.parametrize("keep", [[], [0, 0], [3]], ids=["none", "repeated", "out-of-range"])
def test_select_classes_refuses_an_empty_repeated_or_unknown_list(keep):
    images = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    split = Split(images, torch.tensor([0, 1, 2, 0, 1, 2]))
    dataset = Dataset(name="cifar10", classes=("a", "b", "c"), train=split, test=split, source="test")
    with pytest.raises(ConfigError, match=r"data.classes .* must be one or more distinct class indices in 0..2"):
        select_classes(dataset, keep)
    train, _, classes = select_classes(dataset, [2, 0])
    assert classes == ("c", "a") and train.labels.tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize("changes, message", [
    ({"train_subset": 61}, "data.train_subset is 61, more than the 60 training images of image-folder:"),
    ({"test_subset": 16}, "data.test_subset is 16, more than the 15 test images of image-folder:"),
    ({"classes": [0, 2], "train_subset": 41}, "more than the 40 training images of image-folder:.* \\(data.classes"),
    ({"val_size": 60}, "data.val_size 60 must leave training images: 60 training images of image-folder:"),
    ({"train_subset": 30, "val_size": 30}, "data.val_size 30 must leave training images: 30 training images"),
], ids=["train-subset", "test-subset", "subset-of-classes", "val-size", "val-size-of-subset"])  # fmt: skip
def test_subsets_larger_than_the_data_are_refused_by_field(tmp_path, changes, message):
    from helpers import write_image_folder

    from cifarlab.data.loader import prepare_data

    root = write_image_folder(tmp_path / "images")  # 3 classes, 20 training and 5 test images each
    config = DataConfig(path=str(root), download=False, **changes)
    with pytest.raises(ConfigError, match=message):
        prepare_data(config, device=torch.device("cpu"), seed=0, batch_size=10, eval_batch_size=10, progress=False)
