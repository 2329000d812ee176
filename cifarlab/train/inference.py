"""Using a trained checkpoint: evaluate it on a test set, classify image files and folders."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from cifarlab.data.loader import BatchLoader, select_classes
from cifarlab.data.sources import Split, decode_image, load_dataset, stratified_indices
from cifarlab.errors import ConfigError, DataError
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
    dataset = load_dataset(data or config.data.path, name=config.data.dataset, download=config.data.download,
                           image_size=config.data.image_size, labels=config.data.labels)
    _, test, dataset_classes = select_classes(dataset, config.data.classes)
    if tuple(dataset_classes) != tuple(classes):
        raise DataError(f"{dataset.source} has classes {list(dataset_classes)}, the checkpoint expects {list(classes)}")
    if test_subset is not None:
        if not 1 <= test_subset <= len(test.labels):
            raise ConfigError(f"the test subset must be 1 to {len(test.labels)} images (the test images of "
                              f"{dataset.source}), got {test_subset}")
        test = test.subset(stratified_indices(test.labels, test_subset, seed=0))
    test = Split(images=test.images.to(torch_device), labels=test.labels.to(torch_device))
    loader = BatchLoader(test, batch_size=config.train.eval_batch_size, preprocess=preprocess)
    result = evaluate(model, loader, autocast=autocast_for(torch_device, config.precision_on(torch_device).precision))
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


def _read_file(path: str | Path, size: tuple[int, int], *, crop: bool) -> torch.Tensor:
    """An image file as uint8 (3, H, W) at `size` (H, W), its errors worded for a file named by the user."""
    try:
        array = decode_image(path, size, crop=crop)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{path} is not a readable image: {error}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def find_images(paths: Sequence[str | Path]) -> list[Path]:
    """The files among `paths`, and for each folder the image files below it (recursively, sorted; hidden ones
    skipped). A folder without images is a DataError; a named file is taken as it is, to be read or refused."""
    suffixes = set(Image.registered_extensions())
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            found.append(path)
            continue
        inside = sorted(f for f in path.rglob("*") if f.suffix.lower() in suffixes and f.is_file()
                        and not any(part.startswith(".") for part in f.relative_to(path).parts))
        if not inside:
            raise DataError(f"{path} holds no image files (no file below it has an extension Pillow reads, "
                            "such as .png or .jpg)")
        found += inside
    return found


@torch.no_grad()
def predict_files(
    checkpoint: str | Path, paths: Sequence[str | Path], *, device: str = "auto",
    input_size: tuple[int, int] = (32, 32), batch_size: int = 256, progress: bool = False,
) -> Iterator[tuple[str, dict[str, float]]]:
    """(path, {class: probability}) for each image file, and each image file in the folders among `paths`.

    Images are decoded as the checkpoint's training images were: resized and centre-cropped to its
    data.image_size when it has one, else stretched to `input_size`. `progress`: a bar when there are several
    batches.
    """
    torch_device = resolve_device(device)
    loaded = load_model(checkpoint, device=torch_device)
    model, preprocess, classes = loaded.model, loaded.preprocess, loaded.classes
    files = find_images(paths)
    image_size = loaded.config.data.image_size
    size = input_size if image_size is None else (image_size, image_size)
    with tqdm(total=len(files), unit="img", desc="predicting", disable=not progress or len(files) <= batch_size) as bar:
        for start in range(0, len(files), batch_size):
            batch = files[start:start + batch_size]
            images = torch.stack([_read_file(path, size, crop=image_size is not None) for path in batch])
            probabilities = model(preprocess.from_uint8(images.to(torch_device))).softmax(1).cpu()
            bar.update(len(batch))
            for path, row in zip(batch, probabilities):
                yield str(path), dict(zip(classes, row.tolist()))
