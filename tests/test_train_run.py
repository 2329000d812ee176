"""run_training's frozen-prefix shortcut (computed once, the same batches and the same model as from the images), and
run folders whose epochs are not all evaluated on the test set (train.eval_every)."""
import pytest
import torch
from helpers import write_image_folder

from cifarlab.config import RunConfig
from cifarlab.data.augment import Augment
from cifarlab.data.loader import BatchLoader, TrainData
from cifarlab.data.preprocess import fit_preprocessor
from cifarlab.data.sources import Split
from cifarlab.models import create_model
from cifarlab.report.run_report import compare_runs, read_metrics
from cifarlab.train.checkpoint import read_checkpoint
from cifarlab.train.inference import evaluate_checkpoint
from cifarlab.train.run import precompute_frozen_prefix, run_training


def _data(augment: Augment | None = None) -> TrainData:
    g = torch.Generator().manual_seed(0)
    split = Split(images=torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8, generator=g),
                  labels=torch.randint(0, 10, (30,), generator=g))
    preprocess = fit_preprocessor("none", split.images)
    train = BatchLoader(split, batch_size=8, preprocess=preprocess, augment=augment, sampling="shuffle")
    test = BatchLoader(Split(split.images[:7], split.labels[:7]), batch_size=4, preprocess=preprocess)
    return TrainData(train, {"test": test}, preprocess, tuple("abcdefghij"), "synthetic")


def test_the_prefix_is_computed_once_and_gives_the_models_own_outputs():
    torch.manual_seed(0)
    model, data = create_model("scatter_cnn"), _data()
    cached = precompute_frozen_prefix(model, data, progress=False)
    assert cached.train.images.shape == (30, 243, 8, 8) and cached.train.images.dtype == torch.float32
    assert torch.equal(cached.train.labels, data.train.labels) and cached.train.sampling == "shuffle"
    with torch.no_grad():
        want = model(data.train.images.float() / 255)
        torch.testing.assert_close(model(cached.train.images), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cached.train.images, model.frozen_prefix(data.train.images.float() / 255))
        x, y = next(iter(cached.evals["test"].batches()))
        torch.testing.assert_close(model(x), want[:4], rtol=1e-5, atol=1e-5)
    assert torch.equal(cached.evals["test"].labels, data.train.labels[:7])
    views = BatchLoader(Split(cached.train.images, cached.train.labels), batch_size=8, views=3,
                        preprocess=data.preprocess)  # DP augmentation multiplicity without augmentation
    x, y = next(iter(views.batches()))
    assert x.shape == (24, 243, 8, 8) and torch.equal(x[0], x[2]) and torch.equal(y, data.train.labels[:8].repeat_interleave(3))


def test_no_prefix_or_augmented_training_keeps_the_images():
    assert precompute_frozen_prefix(create_model("tutorial"), _data(), progress=False) is None
    flipping = _data(Augment(flip=True))
    assert precompute_frozen_prefix(create_model("scatter_linear"), flipping, progress=False) is None


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_a_private_scatter_run_trains_on_the_prefix_and_its_checkpoint_reads_images(small_cifar, tmp_path):
    config = RunConfig.from_dict({
        "data": {"path": str(small_cifar), "preprocess": "none", "crop_padding": 0, "flip": False},
        "model": {"name": "scatter_linear"},
        "optim": {"optimizer": "sgd", "lr": 2.0, "momentum": 0.9, "schedule": "constant"},
        "train": {"epochs": 3, "batch_size": 250, "device": "cpu", "progress": False, "out": str(tmp_path / "run")},
        "dp": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 0.1, "delta": 1e-4},
    })
    summary = run_training(config).summary
    assert summary["frozen_prefix_seconds"] > 0 and summary["test_accuracy"] > 0.2  # chance: 0.1
    report = evaluate_checkpoint(tmp_path / "run" / "best.pt", device="cpu")  # from the JPEG files, no cache
    assert report["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)


def test_a_run_tested_every_second_epoch_selects_reports_compares_and_resumes(tmp_path):
    config = RunConfig.from_dict({
        "data": {"path": str(write_image_folder(tmp_path / "images")), "val_size": 15},
        "model": {"name": "tutorial"},
        "optim": {"lr": 0.05},
        "train": {"epochs": 3, "batch_size": 16, "device": "cpu", "progress": False, "eval_every": 2,
                  "out": str(tmp_path / "run")},
    })
    summary = run_training(config).summary
    rows = read_metrics(tmp_path / "run")
    assert [row["val_acc"] is not None for row in rows] == [True, True, True]  # val picks best.pt: every epoch
    assert [row["test_acc"] is not None for row in rows] == [False, True, True]
    assert rows[0]["train_acc"] is not None
    assert summary["best_epoch"] == 1 + max(range(3), key=lambda i: (rows[i]["val_acc"], -i))
    assert summary["selected_by"] == "val_acc" and summary["final_test_accuracy"] == rows[-1]["test_acc"]
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "curves.png").is_file()
    assert "run" in compare_runs([tmp_path / "run"], out=tmp_path)
    extended = RunConfig.from_dict({**config.to_dict(), "train": {**config.to_dict()["train"], "epochs": 5}})
    run_training(extended, resume=tmp_path / "run")
    assert [row["test_acc"] is not None for row in read_metrics(tmp_path / "run")] == [False, True, True, True, True]
    assert read_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 4
