"""TensorBoard event files hold exactly metrics.csv's per-epoch values, read back with TensorBoard's own reader."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

from helpers import write_image_folder
from cifarlab.cli import main
from cifarlab.errors import ConfigError
from cifarlab.train.tracking import TensorBoardLog, require_tensorboard

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from every event file in `run_dir`."""
    events = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


def train(images: Path, out: Path, *extra: str) -> int:
    return main(["train", "--data", str(images), "--model", "tutorial", "--epochs", "2", "--batch-size", "20",
                 "--device", "cpu", "--no-progress", "--threads", "1", "--out", str(out), *extra])  # fmt: skip


def test_log_writes_numeric_cells_at_the_epoch_step(tmp_path: Path):
    log = TensorBoardLog(tmp_path)
    log.log({"epoch": 1, "lr": 0.1, "train_loss": 2.5, "val_acc": None, "epsilon": 1.25, "note": "text"})
    log.log({"epoch": 2, "lr": 0.05, "train_loss": 1.5, "val_acc": None, "epsilon": 2.0, "note": "text"})
    log.close()
    assert read_scalars(tmp_path) == {"lr": {1: pytest.approx(0.1), 2: pytest.approx(0.05)},
                                      "train_loss": {1: 2.5, 2: 1.5}, "epsilon": {1: 1.25, 2: 2.0}}


def test_a_run_with_tensorboard_writes_the_metrics_csv_values(images: Path, tmp_path: Path, capsys):
    run = tmp_path / "with"
    assert train(images, run, "--tensorboard") == 0
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    expected = {column: {int(row["epoch"]): float(row[column]) for row in rows}
                for column in rows[0] if column != "epoch" and rows[0][column] != ""}
    assert {"lr", "train_loss", "train_acc", "test_loss", "test_acc", "images_per_second"} <= set(expected)
    scalars = read_scalars(run)
    assert set(scalars) == set(expected)
    for column, values in expected.items():
        assert scalars[column] == pytest.approx(values, rel=1e-6), column  # event files store float32


def test_compare_works_on_runs_with_and_without_event_files(images: Path, tmp_path: Path, capsys):
    with_events, without = tmp_path / "with", tmp_path / "without"
    assert train(images, with_events, "--tensorboard") == 0
    assert train(images, without) == 0
    assert not list(without.glob("events.out.tfevents.*"))
    capsys.readouterr()
    assert main(["compare", str(with_events), str(without), "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "with " in table and "without" in table


def test_missing_tensorboard_is_a_config_error_before_any_work(images: Path, tmp_path: Path, monkeypatch, capsys):
    # None in sys.modules makes the import fail, as on a machine without the package
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"pip install tensorboard .*cifarlab\[tensorboard\]"):
        require_tensorboard()
    assert train(images, tmp_path / "run", "--tensorboard") == 2
    assert "pip install tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
