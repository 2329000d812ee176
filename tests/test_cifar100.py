"""CIFAR-100 end to end: an archive in the official layout, built from real images, trains through the CLI.

The images are the JPEG copy's CIFAR-10 images relabelled the way CIFAR-100 is organised: 100 fine classes in 20
coarse groups of 5 (coarse = fine // 5). Fine class 10k + j holds every tenth image of CIFAR-10 class k, so a fine
label is learnable up to its CIFAR-10 class only: a net that learned from correctly read labels puts its
predictions in the right block of 10 fine classes far more often than the 1 in 10 of chance.
"""
from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import dump_py2
from PIL import Image

from cifarlab.cli import main
from cifarlab.data.sources import load_dataset
from cifarlab.train.checkpoint import load_model, read_checkpoint

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FINE = tuple(f"{name}_{j}" for name in CIFAR10 for j in range(10))
COARSE = tuple(f"{name}_{half}" for name in CIFAR10 for half in "ab")
PER_CLASS = {"train": 50, "test": 20}  # images per CIFAR-10 class: 5 and 2 per fine class, 700 in all
TRAIN = ["--dataset", "cifar100", "--label-smoothing", "0", "--batch-size", "50", "--seed", "0", "--device", "cpu",
         "--no-progress", "--threads", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def archive(jpeg_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cifar-100-python.tar.gz holding cifar-100-python/{train,test,meta}, pickled as the official files are."""
    root = tmp_path_factory.mktemp("cifar100")
    folder = root / "cifar-100-python"
    folder.mkdir()
    dump_py2({b"fine_label_names": [n.encode() for n in FINE], b"coarse_label_names": [n.encode() for n in COARSE]},
             folder / "meta")
    for split, count in PER_CLASS.items():
        rows, fine, files = [], [], []
        for k, name in enumerate(CIFAR10):
            for j, file in enumerate(sorted((jpeg_root / split / name).iterdir())[:count]):
                pixels = np.asarray(Image.open(file).convert("RGB"))  # (32, 32, 3)
                rows.append(pixels.transpose(2, 0, 1).reshape(-1))  # 1024 red, 1024 green, 1024 blue, row-major
                fine.append(10 * k + j % 10)
                files.append(f"{name}_{file.stem}.png".encode())
        dump_py2({b"filenames": files, b"batch_label": f"{split}ing batch 1 of 1".encode(), b"fine_labels": fine,
                  b"coarse_labels": [f // 5 for f in fine], b"data": np.stack(rows)}, folder / split)
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return root / "cifar-100-python.tar.gz"


def test_the_archive_loads_with_fine_and_with_coarse_labels(archive: Path, jpeg_root: Path) -> None:
    fine = load_dataset(archive, name="cifar100", progress=False)
    assert fine.classes == FINE and fine.source == f"cifar100-python:{archive.resolve()}"
    assert fine.train.images.shape == (500, 3, 32, 32) and fine.test.images.shape == (200, 3, 32, 32)
    assert fine.train.labels.bincount().tolist() == [5] * 100 and fine.test.labels.bincount().tolist() == [2] * 100
    coarse = load_dataset(archive, name="cifar100", labels="coarse", progress=False)
    assert coarse.classes == COARSE and coarse.test.labels.bincount().tolist() == [10] * 20
    assert torch.equal(coarse.train.labels, fine.train.labels // 5)
    first_cat = sorted((jpeg_root / "test" / "cat").iterdir())[0]  # CIFAR-10 class 3: test images 60..79
    pixels = np.asarray(Image.open(first_cat).convert("RGB")).transpose(2, 0, 1)
    assert torch.equal(fine.test.images[60], torch.from_numpy(np.ascontiguousarray(pixels)))
    assert (fine.test.labels[60], coarse.test.labels[60]) == (30, 6)


def _block_accuracy(confusion: list[list[int]], block: int) -> float:
    """Share of the predictions in the right block of `block` consecutive classes."""
    cm = torch.tensor(confusion)
    group = torch.arange(len(cm)) // block
    return cm[group[:, None] == group[None, :]].sum().item() / cm.sum().item()


def test_train_from_the_archive_has_a_100_class_head_and_names_the_classes(archive: Path, jpeg_root: Path,
                                                                            tmp_path: Path, capsys) -> None:
    out = tmp_path / "fine"
    # ScatterNet + linear: fixed features computed once, so 10 epochs take a second or two and learn steadily.
    assert main(["train", "--data", str(archive), *TRAIN, "--model", "scatter_linear", "--preprocess", "none",
                 "--crop-padding", "0", "--no-flip", "--lr", "0.05", "--epochs", "10", "--out", str(out)]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"] == list(FINE) and np.shape(summary["confusion_matrix"]) == (100, 100)
    checkpoint = read_checkpoint(out / "best.pt")
    assert checkpoint["classes"] == list(FINE) and checkpoint["model_state"]["fc.weight"].shape[0] == 100
    assert checkpoint["config"]["data"]["dataset"] == "cifar100" and checkpoint["config"]["data"]["labels"] == "fine"
    right_block = _block_accuracy(summary["confusion_matrix"], 10)
    # 27-29% over seeds 0-2; chance is 10%, with a standard deviation of 2.1 points on 200 test images.
    assert right_block > 0.18, f"{right_block:.0%} of the predictions in the right CIFAR-10 class; chance is 10%"

    predictions = tmp_path / "predictions.csv"
    image = sorted((jpeg_root / "test" / "ship").iterdir())[-1]  # not in the archive
    assert main(["predict", "--checkpoint", str(out / "best.pt"), "--device", "cpu", "--csv", str(predictions),
                 str(image)]) == 0  # fmt: skip
    with open(predictions, newline="") as f:
        (row,) = csv.DictReader(f)
    assert row["class"] in FINE and [key[2:] for key in row if key.startswith("p_")] == list(FINE)


def test_coarse_labels_train_a_20_class_head_that_evaluates_with_them(archive: Path, tmp_path: Path,
                                                                      capsys) -> None:
    out = tmp_path / "coarse"
    assert main(["train", "--data", str(archive), "--labels", "coarse", *TRAIN, "--model", "tutorial",
                 "--epochs", "1", "--out", str(out)]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"] == list(COARSE) and np.shape(summary["confusion_matrix"]) == (20, 20)
    assert load_model(out / "best.pt").model.get_classifier().out_features == 20
    # eval reloads the data with the labels the checkpoint was trained on: class names match, no error.
    report = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(out / "best.pt"), "--device", "cpu", "--out", str(report)]) == 0
    evaluated = json.loads(report.read_text())
    assert list(evaluated["per_class_accuracy"]) == list(COARSE)
    assert evaluated["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)


def test_coarse_labels_on_cifar10_are_refused_before_anything_loads(tmp_path: Path, capsys) -> None:
    code = main(["train", "--labels", "coarse", "--data", str(tmp_path / "nowhere"), "--epochs", "1"])
    assert code == 2
    assert "data.labels 'coarse' (--labels coarse) needs data.dataset cifar100" in capsys.readouterr().err
