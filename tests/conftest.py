"""Shared fixtures: the JPEG copy of CIFAR-10 beside the checkout, and a small real subset of it."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # The suite is thousands of tiny tensor ops: intra-op threads only add synchronisation (and on a busy
    # machine, waits of whole scheduler slices). One thread is faster here and keeps results bit-stable.
    torch.set_num_threads(1)
    # Decoded-data caches go to a temporary folder, never to the user's ~/.cache: set for the whole session (not
    # per test), so that module- and session-scoped fixtures that load data are covered too.
    os.environ["CIFARLAB_CACHE"] = tempfile.mkdtemp(prefix="cifarlab-test-cache-")
    os.environ.pop("CIFARLAB_DATA", None)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ.get("CIFARLAB_CACHE", ""), ignore_errors=True)


JPEG_ROOT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg"


@pytest.fixture(scope="session")
def jpeg_root() -> Path:
    if not (JPEG_ROOT / "train").is_dir():
        pytest.skip(f"the JPEG copy of CIFAR-10 is not at {JPEG_ROOT}")
    return JPEG_ROOT


@pytest.fixture(scope="session")
def small_cifar(jpeg_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image-folder copy with 100 training and 20 test images per class (1,200 real images)."""
    root = tmp_path_factory.mktemp("cifar-small")
    for split, count in (("train", 100), ("test", 20)):
        for class_dir in sorted((jpeg_root / split).iterdir()):
            target = root / split / class_dir.name
            target.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                shutil.copy(image, target / image.name)
    return root
