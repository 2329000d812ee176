"""Self-describing checkpoints: weights + resolved config + preprocessing + class names (+ resume state).

Format: a dict of tensors and plain values written with torch.save and read back with
`torch.load(weights_only=True)`, which refuses anything but tensors and primitive containers, so loading a
checkpoint can never execute code. Writes are atomic: a killed run keeps its previous good checkpoint.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifarlab.config import RunConfig
from cifarlab.data.preprocess import Preprocessor
from cifarlab.errors import CheckpointError
from cifarlab.io import load_tensors, save_tensors
from cifarlab.models import create_model

FORMAT = "cifarlab-checkpoint/1"


def save_checkpoint(path: str | Path, **contents: Any) -> Path:
    """Write {format, **contents} atomically. Expected keys: config, model_state, preprocess, classes, epoch."""
    payload = {"format": FORMAT, **contents}
    return save_tensors(path, payload)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    payload = load_tensors(path, what="checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cifarlab checkpoint (expected format {FORMAT!r})")
    missing = {"config", "model_state", "preprocess", "classes"} - set(payload)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(sorted(missing))}")
    return payload


@dataclass
class LoadedModel:
    """A checkpoint's network (eval mode) with what it needs to be used: its preprocessing, class names and the
    resolved config of the run that trained it."""

    model: nn.Module
    preprocess: Preprocessor
    classes: tuple[str, ...]
    config: RunConfig


def load_model(path: str | Path, *, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the model, its preprocessing and class names from a checkpoint file alone."""
    payload = read_checkpoint(path)
    config = RunConfig.from_dict(payload["config"], source=str(path))
    classes = tuple(payload["classes"])
    model = create_model(config.model.name, num_classes=len(classes), **config.model.args)
    if config.dp.enabled:  # trained privately: the same BatchNorm -> GroupNorm replacement as in training
        from cifarlab.models.per_example import prepare_model  # imports Opacus: only for private runs

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the replacement was announced when the run was trained
            model = prepare_model(model)
    try:
        model.load_state_dict(payload["model_state"])
    except RuntimeError as error:
        raise CheckpointError(f"weights in {path} do not fit model {config.model.name!r}: {error}") from None
    preprocess = Preprocessor.from_state(payload["preprocess"])
    return LoadedModel(model=model.to(device).eval(), preprocess=preprocess.to(device), classes=classes, config=config)
