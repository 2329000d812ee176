"""DP-RandP phase I: the NT-Xent loss on hand-checkable cases, SimCLR steps that learn, `cifarlab prior` end to end,
and private runs that start from the prior, frozen or fine-tuned."""
import json
import math

import pytest
import torch
from helpers import brightest_channel_data

from cifarlab.cli import main
from cifarlab.config import RunConfig
from cifarlab.data.loader import BatchLoader, TrainData
from cifarlab.data.preprocess import fit_preprocessor
from cifarlab.data.sources import Split
from cifarlab.data.synthetic import random_process_images
from cifarlab.errors import CifarlabError, ConfigError
from cifarlab.models import create_model
from cifarlab.models.prior import read_prior
from cifarlab.privacy.clipping import trainable_parameters
from cifarlab.privacy.randp import ContrastiveNet, ContrastiveTraining, ContrastiveViews, build_prior, nt_xent
from cifarlab.train.run import build_run


def test_nt_xent_on_two_pairs_of_orthogonal_views():
    e1, e2 = torch.eye(2)
    z = torch.stack([e1, 3 * e1, e2, e2])  # rows 0, 1: image 0's views (scale does not matter); rows 2, 3: image 1's
    loss, hits = nt_xent(z, temperature=0.5)
    # Each row: its partner at cosine 1 (logit 2), the other two at cosine 0 (logit 0).
    assert loss.item() == pytest.approx(math.log(1 + 2 * math.exp(-2)))
    assert hits.tolist() == [True] * 4
    swapped, hits = nt_xent(torch.stack([e1, e2, e1, e2]), temperature=0.5)  # each view matches the other image's
    assert swapped.item() == pytest.approx(math.log(2 + math.exp(2))) and not hits.any()


def _synthetic_views(count: int) -> torch.Tensor:
    images = random_process_images(count, seed=0, size=32).float().div(255).repeat_interleave(2, 0)
    return ContrastiveViews(min_crop=0.3)(images, torch.Generator().manual_seed(0))  # (2 count, 3, 32, 32)


def test_a_few_contrastive_steps_lower_the_loss():
    torch.manual_seed(0)
    net = ContrastiveNet(create_model("tutorial").features)
    variant = ContrastiveTraining(torch.optim.Adam(net.parameters(), lr=1e-3), temperature=0.5)
    x, y = _synthetic_views(16), torch.arange(16).repeat_interleave(2)
    losses = [variant.step(net, x, y).loss_sum.item() / 16 for _ in range(8)]
    assert losses[-1] < losses[0] - 0.3, losses


def _prior_config(out, **pretrain) -> RunConfig:
    return RunConfig.from_dict({
        "data": {"preprocess": "none"}, "model": {"name": "tutorial"},
        "optim": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
        "train": {"epochs": 1, "batch_size": 16, "out": str(out), "device": "cpu", "progress": False},
        "pretrain": {"images": 32, **pretrain}})


def test_cifarlab_prior_writes_a_run_folder_with_the_prior_and_its_cost(tmp_path):
    out = tmp_path / "prior"
    assert main(["prior", "--model", "tutorial", "--images", "48", "--epochs", "2", "--batch-size", "16",
                 "--process", "dead_leaves", "--process", "spectral_noise", "--out", str(out), "--no-progress",
                 "--device", "cpu"]) == 0  # fmt: skip
    assert {"prior.pt", "summary.json", "metrics.csv", "config.yaml", "last.pt"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 48 and summary["epochs"] == 2 and summary["processes"] == ["dead_leaves",
                                                                                            "spectral_noise"]
    assert summary["train_seconds"] > 0 and summary["generate_seconds"] > 0 and math.isfinite(summary["final_loss"])
    prior = read_prior(out / "prior.pt")
    assert prior["model"] == "tutorial" and prior["preprocess"] == "none" and prior["facts"]["images"] == 48
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch,lr,train_loss,train_acc")
    with pytest.raises(CifarlabError, match="already holds a prior"):
        build_prior(_prior_config(out))


def test_the_prior_is_the_same_for_the_same_seed(tmp_path):
    first, second = build_prior(_prior_config(tmp_path / "a")), build_prior(_prior_config(tmp_path / "b"))
    assert first["final_loss"] == second["final_loss"]
    a, b = read_prior(tmp_path / "a" / "prior.pt")["state"], read_prior(tmp_path / "b" / "prior.pt")["state"]
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_model_with_batch_norm_gets_no_prior(tmp_path):
    config = RunConfig.from_dict({"model": {"name": "cnn_bn"}, "train": {"out": str(tmp_path)}})
    with pytest.raises(ConfigError, match="cannot be trained with a prior for DP-SGD"):
        build_prior(config)



@pytest.mark.parametrize("flags, named", [(["--data", "x"], "--data"), (["--dp"], "--dp"),
                                          (["--model-prior", "p.pt", "--crop-padding", "2"], "--crop-padding, --model-prior")])
def test_cifarlab_prior_refuses_flags_it_would_ignore(tmp_path, capsys, flags, named):
    assert main(["prior", "--out", str(tmp_path / "p"), *flags]) == 2
    assert f"does not take {named}:" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()

@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    out = tmp_path_factory.mktemp("prior")
    build_prior(_prior_config(out))
    return out / "prior.pt"


@pytest.mark.parametrize("freeze", [True, False])
def test_a_private_run_starts_from_the_prior_and_trains_only_what_is_not_frozen(prior, freeze):
    config = RunConfig.from_dict({
        "data": {"preprocess": "none"}, "model": {"name": "tutorial", "prior": str(prior), "freeze_prior": freeze},
        "optim": {"lr": 0.5, "weight_decay": 0.0}, "train": {"batch_size": 16, "seed": 0, "progress": False},
        "dp": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0}})
    run = build_run(config, data=brightest_channel_data(train=64, evals={"test": 8}, preprocess="none"))
    model = run.model
    saved = read_prior(prior)["state"]
    assert all(torch.equal(model.features.state_dict()[key], saved[key]) for key in saved)
    frozen = {id(p) for p in model.features.parameters()}
    in_optimizer = {id(p) for group in run.variant.optimizer.param_groups for p in group["params"]}
    assert (in_optimizer == {id(p) for p in trainable_parameters(model)}) and (frozen.isdisjoint(in_optimizer) == freeze)
    assert all(p.requires_grad != freeze for p in model.features.parameters())
    x, y = next(iter(run.data.train.batches(torch.Generator().manual_seed(0))))
    head = model.fc.weight.clone()
    run.variant.step(model, x, y)
    features_moved = any(not torch.equal(model.features.state_dict()[key], saved[key]) for key in saved)
    assert features_moved != freeze
    assert not torch.equal(model.fc.weight, head)


def test_a_frozen_prior_without_augmentation_is_computed_once_and_the_checkpoint_reads_images(prior):
    g = torch.Generator().manual_seed(0)
    split = Split(images=torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g),
                  labels=torch.randint(0, 3, (40,), generator=g))
    preprocess = fit_preprocessor("none", split.images)
    data = TrainData(BatchLoader(split, batch_size=16, preprocess=preprocess, sampling="shuffle"),
                     {"test": BatchLoader(split, batch_size=16, preprocess=preprocess)}, preprocess, ("a", "b", "c"),
                     "synthetic")
    config = RunConfig.from_dict({
        "data": {"preprocess": "none"}, "model": {"name": "tutorial", "prior": str(prior)},
        "optim": {"lr": 0.5, "weight_decay": 0.0}, "train": {"batch_size": 16, "progress": False},
        "dp": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0}})
    run = build_run(config, data=data)
    assert run.prefix_seconds is not None and run.data.train.images.shape == (40, 16, 5, 5)  # tutorial's features
    x, y = next(iter(run.data.train.batches(torch.Generator().manual_seed(0))))
    run.variant.step(run.model, x, y)
    plain = create_model("tutorial", num_classes=3)
    plain.load_state_dict(run.model.state_dict())
    images = split.images[:5].float() / 255
    with torch.no_grad():
        torch.testing.assert_close(plain(images), run.model(run.data.evals["test"].images[:5]))
