"""The batch pipeline: whole splits held as uint8 tensors on the device, augmented and normalised per batch.

Why not torch.utils.data.DataLoader: CIFAR-10 is 150 MB as uint8, so it fits in (GPU) memory; indexing a resident
tensor and augmenting the whole batch with tensor ops avoids per-sample Python, PIL and worker processes, which
dominate the step time of small models (see benchmarks/pipeline_speed.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from cifarlab.config import DataConfig
from cifarlab.data.augment import Augment
from cifarlab.data.preprocess import Preprocessor, fit_preprocessor, to_float
from cifarlab.data.sources import Dataset, Split, load_dataset, stratified_indices, stratified_split
from cifarlab.errors import ConfigError


class BatchLoader:
    """Yields (x, y) batches: x (B, 3, H, W) float normalised, y (B,) int64, both on the images' device.

    sampling: "shuffle" (a random permutation per epoch), "sequential" (evaluation order), or "poisson" (each
    example joins each batch independently with probability batch_size / N, as DP-SGD's guarantee assumes;
    batches then vary in size and may be empty). `views` > 1 yields each example's augmented views next to each
    other: x is (B * views, ...) with rows [i * views, (i + 1) * views) the views of example i, and y repeats.
    With an augmentation whose `alternate_flip` is set, `flip_seed` draws the half of the images mirrored in epoch 0
    (see `flips`).
    """

    def __init__(
        self,
        split: Split,
        *,
        batch_size: int,
        preprocess: Preprocessor,
        augment: Augment | None = None,
        sampling: str = "sequential",
        views: int = 1,
        drop_last: bool = False,
        flip_seed: int = 0,
    ) -> None:
        if sampling not in ("shuffle", "sequential", "poisson"):
            raise ConfigError(f"sampling {sampling!r} is not valid; choose shuffle, sequential or poisson")
        if len(split.labels) == 0:
            raise ConfigError("cannot build a loader over an empty split")
        self.images, self.labels = split.images, split.labels
        self.batch_size = batch_size
        self.preprocess = preprocess
        self.augment = augment
        self.sampling = sampling
        self.views = views
        self.drop_last = drop_last
        self.flip_seed = flip_seed
        self.flip_parity: Tensor | None = None  # per example: mirrored in even epochs
        if getattr(augment, "alternate_flip", False):  # an Augment; other augmentations (randp's views) flip at random
            drawn = torch.rand(len(self.labels), generator=torch.Generator().manual_seed(flip_seed)) < 0.5
            self.flip_parity = drawn.to(self.labels.device)

    def replace(self, split: Split | None = None, **changes: Any) -> BatchLoader:
        """A loader with this one's settings but for `changes` (constructor arguments), over `split` (default: the
        same images), so that a loader derived from another keeps every setting, the flip pattern included."""
        settings = dict(batch_size=self.batch_size, preprocess=self.preprocess, augment=self.augment,
                        sampling=self.sampling, views=self.views, drop_last=self.drop_last, flip_seed=self.flip_seed)
        return BatchLoader(Split(self.images, self.labels) if split is None else split, **{**settings, **changes})

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    @property
    def sample_rate(self) -> float:
        return min(1.0, self.batch_size / self.num_examples)

    def __len__(self) -> int:
        """Batches per epoch (for Poisson sampling, the expected number: one pass over the data in expectation)."""
        n, b = self.num_examples, self.batch_size
        if self.sampling == "poisson":
            return max(1, round(1 / self.sample_rate))
        return n // b if self.drop_last and n >= b else -(-n // b)

    def batches(self, generator: torch.Generator | None = None, epoch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch's batches; `epoch` (0-based) matters only to alternating flips."""
        for index in self._indices(generator):
            x = self.transform(self.images[index], generator, self.flips(index, epoch))
            yield x, self.labels[index].repeat_interleave(self.views)

    def flips(self, index: Tensor, epoch: int) -> Tensor | None:
        """Alternating flips: which rows of the batch of examples `index` to mirror in `epoch` (None: flips are
        random or off). An image is mirrored in every other epoch, from a random half of the images in epoch 0, and
        its views within an epoch alternate too, so with 2 views it is seen once each way."""
        if self.flip_parity is None:
            return None
        parity = self.flip_parity[index].repeat_interleave(self.views)
        view = torch.arange(self.views, device=index.device).repeat(len(index))
        return parity ^ ((view + epoch) % 2).bool()

    def transform(self, images: Tensor, generator: torch.Generator | None = None,
                  flips: Tensor | None = None) -> Tensor:
        """uint8 (B, 3, H, W) -> float, augmented (`views` times per image; `flips` as `Augment` takes it),
        normalised and resized to the preprocessor's input size. Float inputs are a model's precomputed frozen
        prefix (see train.run.precompute_frozen_prefix), final already."""
        if images.is_floating_point():
            return images.repeat_interleave(self.views, dim=0) if self.views > 1 else images
        x = to_float(images)
        if self.views > 1:
            x = x.repeat_interleave(self.views, dim=0)
        if self.augment is not None and not self.augment.is_identity:
            x = self.augment(x, generator) if flips is None else self.augment(x, generator, flips)
        return self.preprocess(x)

    def _indices(self, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
        n, device = self.num_examples, self.labels.device
        if self.sampling == "poisson":
            for _ in range(len(self)):
                mask = torch.rand(n, generator=generator, device=device) < self.sample_rate
                yield mask.nonzero().squeeze(1)
            return
        if self.sampling == "shuffle":
            order = torch.randperm(n, generator=generator, device=device)
        else:
            order = torch.arange(n, device=device)
        for batch in order.split(self.batch_size):
            if self.drop_last and len(batch) < self.batch_size and n >= self.batch_size:
                return
            yield batch


@dataclass
class TrainData:
    """Everything the engine needs from the data: loaders, the fitted preprocessing, class names."""

    train: BatchLoader
    evals: dict[str, BatchLoader]  # "val" (when held out) and "test"
    preprocess: Preprocessor
    classes: tuple[str, ...]
    source: str


def prepare_data(
    config: DataConfig,
    *,
    device: torch.device,
    seed: int,
    batch_size: int,
    eval_batch_size: int,
    sampling: str = "shuffle",
    views: int = 1,
    progress: bool = True,
) -> TrainData:
    """Load, subset, split and place the data on `device`; fit preprocessing on the training images only."""
    dataset = load_dataset(config.path, name=config.dataset, download=config.download, progress=progress,
                           image_size=config.image_size, labels=config.labels)
    train, test, classes = select_classes(dataset, config.classes)
    of = dataset.source if config.classes is None else f"{dataset.source} (data.classes {config.classes})"
    for field_name, wanted, available, split in (("train_subset", config.train_subset, len(train.labels), "training"),
                                                 ("test_subset", config.test_subset, len(test.labels), "test")):
        if wanted is not None and wanted > available:
            raise ConfigError(f"data.{field_name} is {wanted}, more than the {available} {split} images of {of}")
    to_split = len(train.labels) if config.train_subset is None else config.train_subset
    if config.val_size and config.val_size >= to_split:
        raise ConfigError(f"data.val_size {config.val_size} must leave training images: {to_split} training images "
                          f"of {of} to split")
    if config.train_subset is not None:
        train = train.subset(stratified_indices(train.labels, config.train_subset, seed=seed))
    if config.test_subset is not None:
        test = test.subset(stratified_indices(test.labels, config.test_subset, seed=seed))
    val = None
    if config.val_size:
        keep, held_out = stratified_split(train.labels, config.val_size, seed=seed)
        train, val = train.subset(keep), train.subset(held_out)
    preprocess = fit_preprocessor(config.preprocess, train.images, size=config.input_size).to(device)
    augment = augment_from_config(config)

    def on_device(split: Split) -> Split:
        return Split(images=split.images.to(device), labels=split.labels.to(device))

    train_loader = BatchLoader(
        on_device(train), batch_size=batch_size, preprocess=preprocess, augment=augment, sampling=sampling, views=views,
        flip_seed=seed,
    )
    evals = {} if val is None else {"val": on_device(val)}
    evals["test"] = on_device(test)
    eval_loaders = {
        name: BatchLoader(split, batch_size=eval_batch_size, preprocess=preprocess) for name, split in evals.items()
    }
    return TrainData(train_loader, eval_loaders, preprocess, classes, dataset.source)


def augment_from_config(config: DataConfig) -> Augment:
    """The training augmentation a data config asks for."""
    return Augment(crop_padding=config.crop_padding, pad_mode=config.pad_mode, translate=config.translate,
                   flip=config.flip, alternate_flip=config.alternate_flip, cutout=config.cutout)


def select_classes(dataset: Dataset, keep: list[int] | None) -> tuple[Split, Split, tuple[str, ...]]:
    """Keep only the listed class indices, relabelled 0..k-1 in the given order."""
    if keep is None:
        return dataset.train, dataset.test, dataset.classes
    num_classes = len(dataset.classes)
    bad = [c for c in keep if not 0 <= c < num_classes]
    if not keep or bad or len(set(keep)) != len(keep):
        raise ConfigError(f"data.classes {keep} must be one or more distinct class indices in 0..{num_classes - 1}")
    relabel = relabelling(keep, num_classes)

    def select(split: Split) -> Split:
        mask = relabel[split.labels] >= 0
        return Split(images=split.images[mask], labels=relabel[split.labels[mask]])

    return select(dataset.train), select(dataset.test), tuple(dataset.classes[c] for c in keep)


def relabelling(keep: Sequence[int], num_classes: int) -> Tensor:
    """Lookup table (num_classes,) int64 sending class keep[i] to i and every other class to -1:
    `relabelling(keep, n)[labels]` relabels a subset of classes 0..k-1 in the given order."""
    table = torch.full((num_classes,), -1, dtype=torch.int64)
    table[torch.tensor(list(keep), dtype=torch.int64)] = torch.arange(len(keep))
    return table
