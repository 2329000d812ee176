"""Tests for cifarlab.report: figures as valid PNGs, run-folder reports."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from cifarlab.errors import CifarlabError
from cifarlab.report.plots import plot_compare, plot_confusion, plot_curves, plot_image_grid
from cifarlab.report.run_report import compare_runs, format_table, read_metrics, read_summary, write_run_report

CLASSES = ["cat", "dog", "frog"]
COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
           "epoch_seconds", "images_per_second"]


def make_run(root: Path, name: str, *, test_accuracy: float = 0.9341, val: bool = True, epsilon: bool = False,
             epochs: int = 4) -> Path:
    """A tiny fake run folder as the training engine writes it."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "recipe": None, "model": {"name": "cnn", "args": {"width": 32}}, "optim": {"lr": 0.1, "nesterov": False},
        "train": {"epochs": epochs, "batch_size": 128}, "dp": {"enabled": epsilon, "max_grad_norm": 1.0}}))
    columns = COLUMNS + (["epsilon"] if epsilon else [])
    with open(run / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for e in range(1, epochs + 1):
            row = {"epoch": e, "lr": 0.1 / e, "train_loss": 2 / e, "train_acc": 0.5 + 0.1 * e,
                   "val_loss": 2.1 / e if val else "", "val_acc": 0.45 + 0.1 * e if val else "",
                   "test_loss": 2.2 / e, "test_acc": 0.4 + 0.1 * e, "epoch_seconds": 3.5, "images_per_second": 1234.5}
            if epsilon:
                row["epsilon"] = 0.5 * e if e > 1 else ""  # not measured in epoch 1
            writer.writerow(row)
    cm = [[8, 1, 1], [2, 7, 1], [0, 0, 10]]
    (run / "summary.json").write_text(json.dumps({
        "model": "cnn", "test_accuracy": test_accuracy, "best_epoch": epochs - 1,
        "val_accuracy": 0.8125 if val else None,
        "per_class_accuracy": {"cat": 0.8, "dog": 0.7, "frog": 1.0}, "epochs": epochs, "train_seconds": 754.0,
        "images_per_second": 5123.4, "device": "cpu", "num_parameters": 62006, "classes": CLASSES,
        "confusion_matrix": cm}))
    return run


def assert_png(path: Path) -> tuple[int, int]:
    """Check `path` is a real PNG left by an atomic write; return its (width, height)."""
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 100 and image.height > 100
    assert not list(path.parent.glob(f".{path.name}.*.tmp")), "atomic write left a temporary file"
    return image.size


# ---- plots -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("val, epsilon", [(True, False), (False, False), (False, True)])
def test_plot_curves_writes_png(tmp_path, val, epsilon):
    rows = read_metrics(make_run(tmp_path, "run", val=val, epsilon=epsilon))
    width, height = assert_png(plot_curves(rows, tmp_path / "curves.png", title="cnn"))
    assert width / height > (3.3 if epsilon else 2.2)  # a third panel (accuracy vs epsilon) when logged


def test_plot_confusion_and_image_grid_write_png(tmp_path):
    cm = torch.tensor([[8, 1, 1], [2, 7, 1], [0, 0, 0]])  # an empty row must not divide by zero
    assert_png(plot_confusion(cm, CLASSES, tmp_path / "cm.png"))
    assert_png(plot_confusion(cm, CLASSES, tmp_path / "cm_counts.png", normalize=False))
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert_png(plot_image_grid(images, torch.arange(10) % 3, CLASSES, tmp_path / "grid.png", ncol=4, title="t"))


def test_plot_image_grid_rejects_float_images(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        plot_image_grid(torch.rand(2, 3, 8, 8), [0, 1], CLASSES, tmp_path / "grid.png")


def test_plot_compare_writes_png_and_rejects_unknown_metric(tmp_path):
    runs = {"a": read_metrics(make_run(tmp_path, "a")), "b": read_metrics(make_run(tmp_path, "b", val=False))}
    assert_png(plot_compare(runs, tmp_path / "compare.png", metric="val_acc"))
    with pytest.raises(ValueError, match="test_acc"):
        plot_compare(runs, tmp_path / "x.png", metric="accuracy")


# ---- run folders -----------------------------------------------------------------------------------------

def test_read_metrics_parses_numbers_and_empty_cells(tmp_path):
    rows = read_metrics(make_run(tmp_path, "run", val=False, epsilon=True))
    assert len(rows) == 4
    assert rows[0]["epoch"] == 1 and isinstance(rows[0]["epoch"], int)
    assert rows[1]["test_acc"] == pytest.approx(0.6)
    assert rows[1]["val_acc"] is None
    assert rows[0]["epsilon"] is None and rows[3]["epsilon"] == pytest.approx(2.0)


def test_read_metrics_names_file_line_and_column_of_a_bad_cell(tmp_path):
    run = make_run(tmp_path, "run")
    text = (run / "metrics.csv").read_text().splitlines()
    text[2] = text[2].replace("3.5", "fast")
    (run / "metrics.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(CifarlabError, match=r"metrics\.csv line 3, column 'epoch_seconds': 'fast'"):
        read_metrics(run)


def test_write_run_report(tmp_path):
    run = make_run(tmp_path, "cnn-run", epsilon=True)
    report = write_run_report(run)
    assert report == run / "report.md"
    text = report.read_text()
    assert "93.41%" in text  # test accuracy
    assert "81.25%" in text  # val accuracy
    assert "| dog | 10 | 70.00% |" in text
    assert "| optim.lr | 0.1 |" in text and "| model.args.width | 32 |" in text
    assert "| dp.max_grad_norm | 1.0 |" in text  # DP settings show only when DP was on
    assert "recipe" not in text and "nesterov" not in text  # None values and minor settings are left out
    assert "final epsilon | 2" in text
    assert "12m34s" in text
    assert "![training curves](curves.png)" in text
    assert_png(run / "curves.png")
    assert_png(run / "confusion.png")
    plain = write_run_report(make_run(tmp_path, "plain")).read_text()
    assert "dp." not in plain and "epsilon" not in plain


def test_format_table_aligns_columns():
    rows = [{"run": "a", "acc": 93.41, "lr": 0.1, "n": 10},
            {"run": "long-name", "acc": 82.1, "lr": 1e-5, "n": 2000.0},
            {"run": "c", "acc": None, "lr": 0.0, "n": 12345678}]
    assert format_table(rows, ["run", "acc", "lr", "n"]).splitlines() == [
        "run          acc       lr           n",
        "---------  -----  -------  ----------",
        "a          93.41  0.10000          10",
        "long-name  82.10  0.00001       2,000",
        "c              -  0.00000  12,345,678",
    ]


def test_compare_runs_table_and_figure(tmp_path):
    runs = [make_run(tmp_path, "first", test_accuracy=0.9341), make_run(tmp_path, "second", test_accuracy=0.5,
                                                                             val=False, epochs=2)]
    table = compare_runs(runs, out=tmp_path / "out")
    header, _, first, second = table.splitlines()
    assert header.split()[:4] == ["run", "model", "epochs", "test"]
    assert first.split() == ["first", "cnn", "4", "93.41", "3", "81.25", "12.57", "5,123", "0.06201"]
    assert second.split() == ["second", "cnn", "2", "50.00", "1", "-", "12.57", "5,123", "0.06201"]
    assert_png(tmp_path / "out" / "compare.png")


def test_compare_runs_labels_same_named_runs_by_path(tmp_path):
    runs = [make_run(tmp_path / "x", "run"), make_run(tmp_path / "y", "run")]
    rows = compare_runs(runs, out=tmp_path).splitlines()[2:]
    assert [r.split()[0] for r in rows] == [str(runs[0]), str(runs[1])]


def test_missing_summary_is_reported_with_folder_and_file(tmp_path):
    run = make_run(tmp_path, "broken")
    (run / "summary.json").unlink()
    with pytest.raises(CifarlabError, match=r"broken has no summary\.json"):
        read_summary(run)
    with pytest.raises(CifarlabError, match=r"broken has no summary\.json"):
        compare_runs([run], out=tmp_path)
    with pytest.raises(CifarlabError, match="does not exist"):
        write_run_report(tmp_path / "nowhere")


def test_summary_missing_keys_are_named(tmp_path):
    run = make_run(tmp_path, "old")
    summary = json.loads((run / "summary.json").read_text())
    del summary["best_epoch"], summary["device"]
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(CifarlabError, match="lacks the keys best_epoch, device"):
        read_summary(run)
