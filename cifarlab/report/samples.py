"""`cifarlab data show`: what the model actually sees, as a PNG grid of augmented training images."""
from __future__ import annotations

from pathlib import Path

import torch

from cifarlab.config import RunConfig
from cifarlab.data.loader import augment_from_config, select_classes
from cifarlab.data.preprocess import to_float, to_uint8
from cifarlab.data.sources import load_dataset, stratified_indices
from cifarlab.report.plots import plot_image_grid


def show_augmented(config: RunConfig, *, count: int = 32, out: Path = Path("samples.png")) -> Path:
    """Augment `count` training images (stratified) exactly as training would and save them as a grid."""
    dataset = load_dataset(config.data.path, name=config.data.dataset, download=config.data.download,
                           image_size=config.data.image_size, labels=config.data.labels)
    train, _, classes = select_classes(dataset, config.data.classes)
    picked = train.subset(stratified_indices(train.labels, min(count, len(train.labels)), seed=config.train.seed))
    generator = torch.Generator().manual_seed(config.train.seed)
    as_uint8 = to_uint8(augment_from_config(config.data)(to_float(picked.images), generator))  # (N, 3, H, W)
    title = f"{len(as_uint8)} augmented training images ({dataset.source})"
    plot_image_grid(as_uint8, picked.labels, classes, out, title=title)
    return out
