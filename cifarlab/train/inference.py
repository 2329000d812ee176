"""Using a trained checkpoint: evaluate it on a test set, classify image files."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import UnidentifiedImageError

from cifarlab.data.loader import BatchLoader, select_classes
from cifarlab.data.sources import Split, decode_image, load_dataset, stratified_indices
from cifarlab.errors import DataError
from cifarlab.io import write_json
from cifarlab.metrics import confusion_matrix, per_class_accuracy
from cifarlab.train.checkpoint import load_model
from cifarlab.hardware import autocast_for, resolve_device
from cifarlab.train.engine import evaluate


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data: str | None = None,
    test_subset: int | None = None,
    device: str = "auto",
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Test-set accuracy, loss, per-class accuracy and confusion matrix of a checkpoint.

    The data defaults to the checkpoint's own; its class names must match the checkpoint's.
    """
    torch_device = resolve_device(device)
    loaded = load_model(checkpoint, device=torch_device)
    model, preprocess, classes, config = loaded.model, loaded.preprocess, loaded.classes, loaded.config
    dataset = load_dataset(data or config.data.path, name=config.data.dataset, download=config.data.download)
    _, test, dataset_classes = select_classes(dataset, config.data.classes)
    if tuple(dataset_classes) != tuple(classes):
        raise DataError(f"{dataset.source} has classes {list(dataset_classes)}, the checkpoint expects {list(classes)}")
    if test_subset is not None:
        test = test.subset(stratified_indices(test.labels, test_subset, seed=0))
    test = Split(images=test.images.to(torch_device), labels=test.labels.to(torch_device))
    loader = BatchLoader(test, batch_size=config.train.eval_batch_size, preprocess=preprocess)
    result = evaluate(model, loader, autocast=autocast_for(torch_device, config.train.precision))
    cm = confusion_matrix(result.predictions, result.targets, len(classes))
    report = {
        "checkpoint": str(checkpoint),
        "data": dataset.source,
        "test_accuracy": result.accuracy,
        "test_loss": result.loss,
        "test_images": len(result.targets),
        "per_class_accuracy": dict(zip(classes, per_class_accuracy(cm).tolist())),
        "confusion_matrix": cm.tolist(),
    }
    if out is not None:
        write_json(out, report)
    return report


def _read_file(path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """An image file as uint8 (3, H, W) at `size` (H, W), its errors worded for a file named by the user."""
    try:
        array = decode_image(path, size)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{path} is not a readable image: {error}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


@torch.no_grad()
def predict_files(
    checkpoint: str | Path, paths: list[str], *, device: str = "auto", input_size: tuple[int, int] = (32, 32)
) -> Iterator[tuple[str, dict[str, float]]]:
    """(path, {class: probability}) for each image file."""
    torch_device = resolve_device(device)
    loaded = load_model(checkpoint, device=torch_device)
    model, preprocess, classes = loaded.model, loaded.preprocess, loaded.classes
    images = torch.stack([_read_file(path, input_size) for path in paths]).to(torch_device)
    probabilities = model(preprocess.from_uint8(images)).softmax(1).cpu()
    for path, row in zip(paths, probabilities):
        yield path, dict(zip(classes, row.tolist()))
