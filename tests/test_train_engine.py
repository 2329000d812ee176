"""The one training loop: reproducibility, exact resume, divergence handling, run-folder contents."""
from __future__ import annotations

import csv
import dataclasses
import math

import pytest
import torch
from torch import nn

from cifarlab.config import RunConfig
from cifarlab.data.augment import Augment
from cifarlab.data.loader import BatchLoader, TrainData
from cifarlab.data.preprocess import fit_preprocessor
from cifarlab.data.sources import Split
from cifarlab.models import create_model
from cifarlab.train.checkpoint import read_checkpoint
from cifarlab.train.engine import TrainingDiverged, evaluate, fit, plain_training
from cifarlab.train.variant import PlainTraining
from cifarlab.train.optim import lr_factor


def synthetic_data(n_train: int = 96, n_test: int = 40, seed: int = 0) -> TrainData:
    """Learnable toy task: class = which colour channel is brightest."""
    generator = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        labels = torch.arange(n) % 3
        images = torch.randint(0, 100, (n, 3, 32, 32), generator=generator, dtype=torch.uint8)
        images[torch.arange(n), labels] += 120
        return Split(images=images, labels=labels)

    train, test = split(n_train), split(n_test)
    preprocess = fit_preprocessor("normalize", train.images)
    augment = Augment(crop_padding=2, flip=True)
    return TrainData(
        train=BatchLoader(train, batch_size=16, preprocess=preprocess, augment=augment, sampling="shuffle"),
        evals={"test": BatchLoader(test, batch_size=64, preprocess=preprocess)},
        preprocess=preprocess,
        classes=("r", "g", "b"),
        source="synthetic",
    )


def config(epochs: int = 3, eval_every: int = 1, **optim) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"name": "tutorial"},
            "optim": {"optimizer": "sgd", "lr": 0.05, "schedule": "cosine", **optim},
            "train": {"epochs": epochs, "batch_size": 16, "device": "cpu", "progress": False, "seed": 3,
                      "eval_every": eval_every},
        }
    )


class _Hooked(PlainTraining):
    """Plain training that calls `hook(epoch, model)` at every epoch's end."""

    def __init__(self, model, hook):
        plain = plain_training(model, config())
        super().__init__(plain.optimizer, label_smoothing=plain.label_smoothing, grad_clip=plain.grad_clip)
        self.hook = hook

    def on_epoch_end(self, epoch, model):
        self.hook(epoch, model)
        return {}


def train(run_dir=None, on_epoch_end=None, eval_every=1, data=None, **kwargs):
    torch.manual_seed(0)
    model = create_model("tutorial", num_classes=3)
    variant = _Hooked(model, on_epoch_end) if on_epoch_end is not None else None
    return fit(model, data=data or synthetic_data(), config=config(eval_every=eval_every), run_dir=run_dir,
               variant=variant, **kwargs)


def with_val(data: TrainData) -> TrainData:
    """The data with a validation split (the test images again), so that best.pt is chosen by val_acc."""
    return dataclasses.replace(data, evals={"val": data.evals["test"], **data.evals})


def test_evaluated_accuracy_is_exact_at_a_threshold():
    labels = torch.zeros(10_000, dtype=torch.long)
    labels[:1000] = 1  # the constant model below predicts class 0: right on exactly 9,000 of 10,000
    loader = BatchLoader(Split(torch.zeros(10_000, 3, 2, 2, dtype=torch.uint8), labels), batch_size=5000,
                         preprocess=fit_preprocessor("none", torch.zeros(2, 3, 2, 2, dtype=torch.uint8)))
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 0.0]))
    assert evaluate(model, loader).accuracy >= 0.9  # float32's mean gives 0.89999998


def test_eval_from_skips_the_early_evaluations_but_not_in_a_run_folder(tmp_path):
    history = train(eval_from=3).history
    assert [row["test_acc"] is None for row in history] == [True, True, False]
    with pytest.raises(ValueError, match="eval_from > 1"):
        train(tmp_path, eval_from=2)


@pytest.mark.parametrize("every, evaluated", [(2, [False, True, True]), (0, [False, False, True])])
def test_eval_every_evaluates_every_kth_and_the_last_epoch_and_leaves_training_alone(tmp_path, every, evaluated):
    each = train()
    sparse = train(tmp_path, eval_every=every)
    assert [row["test_acc"] is not None for row in sparse.history] == evaluated
    assert all(row["train_loss"] is not None and row["train_acc"] is not None for row in sparse.history)
    assert [r["train_loss"] for r in sparse.history] == [r["train_loss"] for r in each.history]
    assert sparse.history[-1]["test_acc"] == each.history[-1]["test_acc"]
    assert sparse.train_seconds > 0
    for a, b in zip(each.model.state_dict().values(), sparse.model.state_dict().values()):
        assert torch.equal(a, b)  # evaluation draws none of training's random numbers
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["test_acc"] != "" for r in rows] == evaluated and all(r["train_acc"] != "" for r in rows)


def test_val_is_evaluated_every_epoch_so_best_pt_and_a_resume_do_not_depend_on_the_cadence(tmp_path):
    each = train(tmp_path / "each", data=with_val(synthetic_data()))
    sparse = train(tmp_path / "sparse", eval_every=0, data=with_val(synthetic_data()))
    assert [row["val_acc"] for row in sparse.history] == [row["val_acc"] for row in each.history]
    assert [row["test_acc"] is not None for row in sparse.history] == [False, False, True]
    best = read_checkpoint(tmp_path / "sparse" / "best.pt")
    assert best["epoch"] == read_checkpoint(tmp_path / "each" / "best.pt")["epoch"]

    def killed_after_first_epoch(epoch, model):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "killed", on_epoch_end=killed_after_first_epoch, eval_every=0, data=with_val(synthetic_data()))
    payload = read_checkpoint(tmp_path / "killed" / "last.pt")
    resumed = fit(create_model("tutorial", num_classes=3), data=with_val(synthetic_data()), config=config(eval_every=0),
                  run_dir=tmp_path / "killed", resume=payload)
    for column in ("train_loss", "val_acc", "test_acc"):
        assert [r[column] for r in resumed.history] == [r[column] for r in sparse.history]
    assert read_checkpoint(tmp_path / "killed" / "best.pt")["epoch"] == best["epoch"]


def test_learns_the_toy_task_and_writes_the_run_folder(tmp_path):
    result = train(tmp_path)
    assert result.history[-1]["test_acc"] > 0.8
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert rows[0]["val_acc"] == ""  # no validation set: column present, empty
    last, best = read_checkpoint(tmp_path / "last.pt"), read_checkpoint(tmp_path / "best.pt")
    assert last["epoch"] == best["epoch"] == 2  # without a val set the last epoch is the selected one
    assert "optimizer_state" in last and "optimizer_state" not in best


def test_same_seed_gives_bit_identical_runs_on_cpu():
    first, second = train(), train()
    assert first.history[-1]["train_loss"] == second.history[-1]["train_loss"]
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_continues_exactly_where_a_killed_run_stopped(tmp_path):
    straight = train()

    def killed_after_first_epoch(epoch, model):
        if epoch == 1:
            raise KeyboardInterrupt  # the second epoch never finishes: only epoch 1's checkpoint exists

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, on_epoch_end=killed_after_first_epoch)
    payload = read_checkpoint(tmp_path / "last.pt")
    assert payload["epoch"] == 0
    torch.manual_seed(123)  # a different process: nothing but the checkpoint carries state
    model = create_model("tutorial", num_classes=3)
    resumed = fit(model, data=synthetic_data(), config=config(), run_dir=tmp_path, resume=payload)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


class _Poisoned(nn.Module):
    """Returns NaN logits once `poisoned` is set: a loss blow-up on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.net = create_model("tutorial", num_classes=3)
        self.poisoned = False

    def forward(self, x):
        logits = self.net(x)
        return logits * float("nan") if self.poisoned else logits


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    model = _Poisoned()

    def poison(epoch, module):
        module.poisoned = True

    with pytest.raises(TrainingDiverged, match="loss became nan in epoch 2.*last.pt"):
        fit(model, data=synthetic_data(), config=config(), run_dir=tmp_path, variant=_Hooked(model, poison))
    payload = read_checkpoint(tmp_path / "last.pt")
    assert payload["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in payload["model_state"].values() if t.is_floating_point())


@pytest.mark.parametrize(
    "schedule, extra, expected",
    [
        ("constant", {}, [1, 1, 1, 1, 1, 1]),
        ("step", {"step_size": 1, "gamma": 0.5}, [1, 1, 0.5, 0.5, 0.25, 0.25]),
        ("multistep", {"milestones": [2], "gamma": 0.1}, [1, 1, 1, 1, 0.1, 0.1]),
        ("cosine", {}, [0.5 * (1 + math.cos(math.pi * step / 6)) for step in range(6)]),
    ],
)
def test_schedules_per_step(schedule, extra, expected):
    optim = config(3, schedule=schedule, **extra).optim
    factor = lr_factor(optim, epochs=3, steps_per_epoch=2)
    assert [factor(step) for step in range(6)] == pytest.approx(expected)


def test_warmup_then_onecycle():
    optim = config(4, schedule="onecycle", warmup_epochs=1).optim
    factor = lr_factor(optim, epochs=4, steps_per_epoch=2)
    assert [factor(s) for s in range(8)] == pytest.approx([0.5, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
