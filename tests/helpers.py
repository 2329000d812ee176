"""Small synthetic data shared by several test modules: learnable toy tasks that cost milliseconds."""
from __future__ import annotations

import io
import os
import pickle
import socket
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from cifarlab.data.augment import Augment
from cifarlab.data.loader import BatchLoader, TrainData
from cifarlab.data.preprocess import fit_preprocessor
from cifarlab.data.sources import Split


def brightest_channel_data(*, train: int, evals: dict[str, int], batch_size: int = 16,
                           preprocess: str = "normalize") -> TrainData:
    """Class = the brightest colour channel (3 classes), 32x32 uint8 images; training batches are augmented."""
    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        labels = torch.arange(n) % 3
        images = torch.randint(0, 100, (n, 3, 32, 32), generator=generator, dtype=torch.uint8)
        images[torch.arange(n), labels] += 120
        return Split(images=images, labels=labels)

    train_split = split(train)
    eval_splits = {name: split(n) for name, n in evals.items()}
    fitted = fit_preprocessor(preprocess, train_split.images)
    return TrainData(
        train=BatchLoader(train_split, batch_size=batch_size, preprocess=fitted,
                          augment=Augment(crop_padding=2, flip=True), sampling="shuffle"),
        evals={name: BatchLoader(s, batch_size=32 if name == "test" else 64, preprocess=fitted)
               for name, s in eval_splits.items()},
        preprocess=fitted, classes=("r", "g", "b"), source="synthetic")


def write_image_folder(root: Path, *, classes: int = 3, train: int = 20, test: int = 5) -> Path:
    """train/<class>/*.png and test/<class>/*.png, 32x32, each class a brightness band (learnable, not trivial)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (32, 32, 3)) + 80 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def train_tiny_run(data: Path, out: Path, *, model: str = "tutorial", flags: Sequence[str] = ()) -> Path:
    """A real checkpoint from `cifarlab train`: one epoch on a tiny image folder, in about a second."""
    from cifarlab.cli import main

    assert main(["train", "--data", str(data), "--model", model, *flags, "--epochs", "1", "--batch-size", "16",
                 "--device", "cpu", "--no-progress", "--out", str(out)]) == 0  # fmt: skip
    return out / "best.pt"


class _Py2Pickler(pickle._Pickler):
    """Pickles str and bytes as Python 2 `str` (SHORT_BINSTRING/BINSTRING), as cPickle did for CIFAR."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_str8(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = dispatch[bytes] = _save_str8


def dump_py2(obj: object, path: Path) -> None:
    """Pickle `obj` as the official CIFAR python files are: protocol 2, Python 2 `str` for bytes, numpy arrays
    through `numpy.core.multiarray._reconstruct`."""
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    # numpy >= 2 names its own module numpy._core; the official files say numpy.core.
    path.write_bytes(buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_process_group(rank: int, world_size: int, port: int) -> None:
    """In a test's worker process: join a gloo group on this machine as torchrun's rank `rank` would."""
    from cifarlab.train import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.setup(torch.device("cpu"))
