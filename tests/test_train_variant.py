"""Training variants through the one engine: every variant (DP-SGD, SGLD, SGLD-DP) killed after k epochs and
resumed from last.pt ends bit-identical (CPU) to an uninterrupted run, its own state (accountant, noise generator,
posterior samples) included."""
from __future__ import annotations

import pytest
import torch

from helpers import brightest_channel_data
from cifarlab.config import SAMPLING_METHODS, RunConfig
from cifarlab.data.loader import TrainData
from cifarlab.train.checkpoint import read_checkpoint
from cifarlab.train.engine import FitResult
from cifarlab.train.run import build_run
from cifarlab.train.variant import PlainTraining, StepResult, TrainingVariant
from cifarlab.uncertainty.sgld import PosteriorSampling, SampleCollector

EPOCHS, KILLED_AT = 3, 1  # the run dies during epoch 2 (index 1): last.pt holds epoch 1
TIMINGS = {"epoch_seconds", "images_per_second"}


def synthetic_data() -> TrainData:
    return brightest_channel_data(train=96, evals={"val": 30}, preprocess="none")


def config(training: str) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"name": "tutorial"},
        "optim": {"lr": 0.05, "schedule": "cosine", "weight_decay": 1e-3},
        "train": {"epochs": EPOCHS, "batch_size": 16, "device": "cpu", "progress": False, "seed": 5},
        "dp": {"enabled": training == "dp", "noise_multiplier": 0.8, "accountant": "rdp", "delta": 1e-3},
        "uncertainty": {"method": training if training in SAMPLING_METHODS else "none", "burn_in": 0,
                        "noise_multiplier": 1.0},
    })


class KilledAfter:
    """A variant that stops the process (KeyboardInterrupt) at the end of epoch `epoch`, before it is saved."""

    def __init__(self, variant: TrainingVariant, epoch: int) -> None:
        self.variant, self.epoch, self.optimizer = variant, epoch, variant.optimizer
        self.eval_model = variant.eval_model

    def step(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        return self.variant.step(model, x, y)

    def on_epoch_end(self, epoch: int, model: torch.nn.Module) -> dict[str, float]:
        if epoch == self.epoch:
            raise KeyboardInterrupt
        return self.variant.on_epoch_end(epoch, model)

    def state_dict(self) -> dict:
        return self.variant.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.variant.load_state_dict(state)


def train(training: str, run_dir, *, killed_at: int | None = None, resume: dict | None = None) -> FitResult:
    """A fresh process's view: the run rebuilt from its config, then trained (or resumed)."""
    torch.manual_seed(1234)  # whatever the process did before: only the config and the checkpoint carry state
    run = build_run(config(training), data=synthetic_data(), training=training, run_dir=run_dir)
    if training in SAMPLING_METHODS:
        run.variant = PosteriorSampling(run.variant, SampleCollector(directory=run_dir / "samples"))
    if killed_at is not None:
        run.variant = KilledAfter(run.variant, killed_at)
    return run.fit(resume=resume)


@pytest.mark.parametrize("training", ["dp", "sgld", "sgld-dp"])
def test_killed_and_resumed_run_equals_an_uninterrupted_one(training, tmp_path):
    straight = train(training, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train(training, tmp_path / "killed", killed_at=KILLED_AT)
    payload = read_checkpoint(tmp_path / "killed" / "last.pt")
    assert payload["epoch"] == KILLED_AT - 1
    resumed = train(training, tmp_path / "killed", resume=payload)

    def metrics(result: FitResult) -> list[dict]:
        return [{k: v for k, v in row.items() if k not in TIMINGS} for row in result.history]

    assert metrics(resumed) == metrics(straight)  # loss, accuracy, epsilon, clipped fraction, samples: exactly
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    last = {name: read_checkpoint(tmp_path / name / "last.pt")["variant_state"] for name in ("straight", "killed")}
    assert repr(last["straight"]) == repr(last["killed"])  # accountant history, generator state, sample files
    if training in SAMPLING_METHODS:
        samples = [sorted((tmp_path / name / "samples").iterdir()) for name in ("straight", "killed")]
        assert [p.name for p in samples[0]] == [p.name for p in samples[1]] == [f"sample_000{i}.pt" for i in range(3)]
        for a, b in zip(*samples):
            sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
    if "dp" in training:
        assert straight.history[-1]["epsilon"] > 0


def test_plain_training_is_the_default_variant(tmp_path):
    run = build_run(config("plain"), data=synthetic_data())
    assert isinstance(run.variant, PlainTraining) and run.variant.eval_model is None and run.run_dir is None
    assert run.variant.state_dict() == {} and run.variant.on_epoch_end(0, run.model) == {}


def test_weight_decay_on_weights_spares_norm_layers_and_biases():
    from cifarlab.models import create_model
    from cifarlab.train.optim import build_optimizer

    model = create_model("cnn_bn", num_classes=3)
    every = RunConfig.from_dict({"optim": {"weight_decay": 0.1}}).optim
    weights = RunConfig.from_dict({"optim": {"weight_decay": 0.1, "weight_decay_on": "weights"}}).optim
    (group,) = build_optimizer(model, every).param_groups
    assert group["weight_decay"] == 0.1 and len(group["params"]) == len(list(model.parameters()))
    decayed, spared = build_optimizer(model, weights).param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.ndim >= 2 for p in decayed["params"])
    assert spared["weight_decay"] == 0.0 and spared["params"] and all(p.ndim < 2 for p in spared["params"])


@pytest.mark.parametrize("training", ["plain", "sgld"])
def test_every_run_computes_a_frozen_prefix_once(training):
    # uncertainty runs of scatter_* are built like `cifarlab train`: the scattering is not redone every epoch
    data = synthetic_data()
    data.train.augment = None  # augmentation would make each epoch's prefix differ
    settings = RunConfig.from_dict({**config(training).to_dict(), "model": {"name": "scatter_linear", "args": {}}})
    run = build_run(settings, data=data, training=training)
    assert run.prefix_seconds is not None and run.data.train.images.is_floating_point()
