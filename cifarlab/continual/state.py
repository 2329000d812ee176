"""The classifier state on disk: learned statistics + class names + the backbone's identity + the feature
transform the statistics are of (and their feature bank, when one is kept).

Format: a dict of plain values and tensors written atomically with torch.save and read with
`torch.load(weights_only=True)`, so loading a state never runs code. Operations return a new
state and save it only once everything succeeded, so bad input leaves the file as it was.
A state written before transforms and banks existed loads with transform "none" and no bank.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from cifarlab.continual.features import (FEATURE_BATCH_SIZE, Backbone, check_same_backbone, describe_backbone,
                                         extract_features)
from cifarlab.continual.stats import ClassStats, FeatureStats, StreamStats
from cifarlab.continual.transforms import TRANSFORMS
from cifarlab.data.sources import read_images
from cifarlab.errors import CheckpointError, ConfigError, DataError
from cifarlab.io import load_tensors, save_tensors
from cifarlab.train.checkpoint import load_model
from cifarlab.hardware import resolve_device

FORMAT = "cifarlab-continual-state/1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ContinualState:
    backbone: Backbone
    stats: FeatureStats

    @classmethod
    def empty(cls, backbone: Backbone, dim: int, *, feature_transform: str = "none",
              bank_size: int = 0) -> ContinualState:
        """A state that knows no class yet; every feature it learns goes through `feature_transform` first, and it
        keeps up to `bank_size` of each class's features (0: none) for the kNN novelty score."""
        return cls(backbone, FeatureStats.empty(dim, transform=feature_transform, bank_size=bank_size))

    @property
    def classes(self) -> tuple[str, ...]:
        return self.stats.classes

    @property
    def feature_transform(self) -> str:
        return self.stats.transform

    def add_class(self, name: str, batches: Iterable[Tensor], *, backbone: Backbone) -> ContinualState:
        """A new state that also knows class `name`, from features made by `backbone`."""
        check_same_backbone(self.backbone, backbone)
        return ContinualState(self.backbone, self.stats.add_class(name, batches))


def state_to_dict(state: ContinualState) -> dict[str, Any]:
    stats = state.stats
    per_class = stats.per_class
    dim = stats.dim
    return {
        "format": FORMAT,
        "backbone": state.backbone.to_dict(),
        "classes": list(stats.classes),
        "counts": torch.tensor([c.count for c in per_class], dtype=torch.int64),
        "sums": torch.stack([c.sum for c in per_class]) if per_class else torch.zeros(0, dim, dtype=torch.float64),
        "scatters": (torch.stack([c.scatter for c in per_class]) if per_class
                     else torch.zeros(0, dim, dim, dtype=torch.float64)),
        "stream_updates": stats.stream.updates,
        "stream_scatter": stats.stream.scatter,
        "feature_transform": stats.transform,
        "bank_size": stats.bank_size,
        "bank_counts": torch.tensor([len(b) for b in stats.bank], dtype=torch.int64),
        "bank": torch.cat(stats.bank) if stats.bank else torch.zeros(0, dim, dtype=torch.float32),
    }


def state_from_dict(payload: Any, *, source: str = "state") -> ContinualState:
    """Validate a loaded dict and rebuild the state; CheckpointError naming what is wrong."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{source} is not a cifarlab continual state (expected format {FORMAT!r})")
    try:
        backbone = Backbone(**payload["backbone"])
        classes, counts = list(payload["classes"]), payload["counts"]
        sums, scatters, stream_scatter = payload["sums"], payload["scatters"], payload["stream_scatter"]
        dim, n = stream_scatter.shape[0], len(classes)
        shapes_ok = (counts.shape == (n,) and sums.shape == (n, dim) and scatters.shape == (n, dim, dim)
                     and stream_scatter.shape == (dim, dim) and all(isinstance(c, str) for c in classes)
                     and len(set(classes)) == n and bool((counts > 0).all()))
        updates = int(payload["stream_updates"])
        transform = payload.get("feature_transform", "none")
        bank_size = int(payload.get("bank_size", 0))
        bank_counts = payload.get("bank_counts", torch.zeros(0, dtype=torch.int64))
        bank = payload.get("bank", torch.zeros(0, dim, dtype=torch.float32))
        bank_ok = (bank_size >= 0 and bank.dim() == 2 and bank.shape[1] == dim
                   and bank_counts.shape == ((n,) if bank_size else (0,)) and bool((bank_counts >= 0).all())
                   and bool((bank_counts <= bank_size).all()) and int(bank_counts.sum()) == bank.shape[0])
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as error:
        raise CheckpointError(f"{source} is a damaged continual state: {error!r}") from None
    if not shapes_ok:
        raise CheckpointError(f"{source} is a damaged continual state: inconsistent classes/statistics shapes")
    if transform not in TRANSFORMS:
        raise CheckpointError(f"{source} records an unknown feature transform {transform!r}; "
                              f"valid: {', '.join(TRANSFORMS)}")
    if not bank_ok:
        raise CheckpointError(f"{source} is a damaged continual state: inconsistent feature bank shapes")
    per_class = tuple(ClassStats(count=int(c), sum=s.double(), scatter=m.double())
                      for c, s, m in zip(counts, sums, scatters))
    stats = FeatureStats(classes=tuple(classes), per_class=per_class,
                         stream=StreamStats(updates=updates, scatter=stream_scatter.double()),
                         transform=transform, bank_size=bank_size,
                         bank=tuple(bank.float().split(bank_counts.tolist())) if bank_size else ())
    return ContinualState(backbone, stats)


def save_state(path: str | Path, state: ContinualState) -> Path:
    """Write the state atomically: the file holds either the old or the new state, never half."""
    payload = state_to_dict(state)
    return save_tensors(path, payload)


def load_state(path: str | Path) -> ContinualState:
    payload = load_tensors(path, what="continual state")
    return state_from_dict(payload, source=str(path))


def add_class_from_folder(state_path: str | Path, class_name: str, images_dir: str | Path, *,
                          checkpoint: str | Path | None = None, device: str = "auto",
                          batch_size: int = FEATURE_BATCH_SIZE) -> ContinualState:
    """Learn `class_name` from every image in `images_dir` with the state's own backbone
    (rebuilt from `checkpoint`, default the one recorded in the state, and run at the state's
    precision) and replace the state file; on any error the file is left as it was."""
    state = load_state(state_path)
    if class_name in state.classes:  # checked before the expensive part; add_class checks again
        raise ConfigError(f"class {class_name!r} is already learned in {state_path} "
                          f"(learned: {', '.join(state.classes)})")
    folder = Path(images_dir)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    files = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)  # the dataset's order
    if not files:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}): an empty class cannot be learned")
    source = checkpoint if checkpoint is not None else state.backbone.checkpoint
    if source is None:
        raise ConfigError(f"{state_path} records no backbone checkpoint; pass checkpoint=... (--checkpoint)")
    loaded = load_model(source, device=resolve_device(device))
    model, preprocess = loaded.model, loaded.preprocess
    saved = state.backbone
    backbone = describe_backbone(model, preprocess, layer=saved.layer, image_size=saved.image_size,
                                 precision=saved.precision, checkpoint=str(source))
    check_same_backbone(saved, backbone)
    images = torch.from_numpy(read_images(files, size=(saved.image_size, saved.image_size)))  # (N, 3, H, W) uint8
    features = extract_features(model, images, preprocess=preprocess, layer=saved.layer, batch_size=batch_size,
                                precision=saved.precision)
    new_state = state.add_class(class_name, features.split(batch_size), backbone=backbone)
    save_state(state_path, new_state)
    return new_state
