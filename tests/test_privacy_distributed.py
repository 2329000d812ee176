"""DP-SGD on 2 gloo processes: the ranks' shares partition each Poisson batch, the clipped sums are added over the
ranks with the noise drawn once, and every rank steps and accounts as one process would."""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
from pathlib import Path

import pytest
import torch

from helpers import brightest_channel_data, free_port, join_process_group, write_image_folder
from cifarlab.cli import main
from cifarlab.config import RunConfig
from cifarlab.data.augment import Augment
from cifarlab.data.loader import BatchLoader
from cifarlab.data.preprocess import fit_preprocessor
from cifarlab.data.sources import Split
from cifarlab.models import create_model
from cifarlab.privacy import accounting
from cifarlab.privacy.dpsgd import PrivateTraining, make_private, prepare_model
from cifarlab.train import distributed
from cifarlab.train.engine import epoch_seed, fit
from cifarlab.train.optim import build_optimizer

CONFIG = RunConfig.from_dict({
    "model": {"name": "tutorial"},
    "optim": {"optimizer": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 0.0, "schedule": "cosine"},
    "train": {"epochs": 1, "batch_size": 3, "device": "cpu", "progress": False, "seed": 4},
})
SIGMA, CLIP = 1.3, 0.7
DATA = brightest_channel_data(train=48, evals={}, batch_size=CONFIG.train.batch_size, preprocess="none")


def private_training(*, lr: float = CONFIG.optim.lr, momentum: float = CONFIG.optim.momentum) -> PrivateTraining:
    """The tutorial LeNet made private over 48 images: Poisson batches of expected size 3 (q = 1/16), 2 views,
    micro-batches of 2 examples, EMA."""
    torch.manual_seed(0)
    model = prepare_model(create_model("tutorial", num_classes=3))
    optimizer = build_optimizer(model, dataclasses.replace(CONFIG.optim, lr=lr, momentum=momentum))
    return make_private(model, optimizer, DATA.train, epochs=CONFIG.train.epochs, max_grad_norm=CLIP,
                        noise_multiplier=SIGMA, augmult=2, physical_batch_size=2, ema=0.9,
                        accountant="rdp")


def dp_fit(*, noise: bool, shift: float = 0.0) -> PrivateTraining:
    """An epoch of DP-SGD through the engine (16 steps). Without `noise` the noise multiplier is 0, set after
    make_private (which refuses it) so that ranks and one process can be compared weight for weight; the accountant
    is then left out (it has nothing to account). `shift` is added to the weights before training."""
    private = private_training()
    if not noise:
        private.optimizer.noise_multiplier, private.optimizer.step_hook = 0.0, None
    with torch.no_grad():
        for p in private.model.parameters():
            p.add_(shift)
    fit(private.model, data=dataclasses.replace(DATA, train=private.loader), config=CONFIG, variant=private)
    return private


NOISE_STEPS = 3


def noise_steps() -> dict:
    """NOISE_STEPS DP-SGD steps on empty batches (SGD, lr 1, no momentum), so each update is the step's noise
    divided by q N: the updates times q N, and the epsilon spent."""
    private = private_training(lr=1.0, momentum=0.0)
    params = list(private.model.parameters())
    updates = []
    for _ in range(NOISE_STEPS):
        before = torch.cat([p.detach().flatten() for p in params])
        private.step(private.model, torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long))
        updates.append(before - torch.cat([p.detach().flatten() for p in params]))
    return {"noise": torch.cat(updates) * private.optimizer.expected_batch_size, "epsilon": private.epsilon(),
            "steps": private.steps}


def outcome(private: PrivateTraining) -> dict:
    return {"model": private.model.state_dict(), "ema": private.ema.model.state_dict(),
            "clipped_fraction": private.clipped_fraction(), "examples": private.state_dict()["examples"]}



CLI_ARGS = ("--model", "tutorial", "--preprocess", "none", "--epochs", "2", "--batch-size", "8", "--dp",
            "--noise-multiplier", "1.5", "--max-grad-norm", "1", "--augmult", "2", "--ema", "0.9",
            "--accountant", "rdp", "--threads", "1", "--device", "cpu", "--no-progress")  # fmt: skip


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    """One rank as torchrun starts it (the same environment variables): the library runs, then `cifarlab train`."""
    join_process_group(rank, world_size, port)
    try:
        # rank 1 starts from other weights: training must start from rank 0's, as with DDP
        results = {"exact": outcome(dp_fit(noise=False, shift=float(rank))), **noise_steps()}
        torch.save(results, Path(out) / f"rank{rank}.pt")
        assert main(["train", "--data", str(Path(out) / "images"), *CLI_ARGS, "--out", str(Path(out) / "run")]) == 0
    finally:
        distributed.cleanup()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with what each of 2 gloo ranks measured (rank<r>.pt) and their `cifarlab train` run (see _worker)."""
    out = tmp_path_factory.mktemp("dp-ranks")
    write_image_folder(out / "images", train=16, test=4)  # 48 training images
    # The ranks fork from a server that imported this module once: spawning them would import torch and Opacus
    # in each (about 12 s of CPU apiece), and forking pytest itself would copy its threads' locks.
    multiprocessing.set_forkserver_preload([__name__])
    torch.multiprocessing.start_processes(_worker, args=(2, free_port(), str(out)), nprocs=2,
                                          start_method="forkserver")
    return out


@pytest.fixture(scope="module")
def ranks(spawned: Path) -> list[dict]:
    return [torch.load(spawned / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


def test_without_noise_two_ranks_train_like_one_process_on_the_same_poisson_batches(ranks):
    single = outcome(dp_fit(noise=False))
    for rank in ranks:
        for key in ("model", "ema"):
            for name, value in single[key].items():
                torch.testing.assert_close(rank["exact"][key][name], value, atol=1e-6, rtol=1e-5, msg=f"{key} {name}")
        assert rank["exact"]["clipped_fraction"] == single["clipped_fraction"] > 0
    assert ranks[0]["exact"]["examples"] == single["examples"] and ranks[1]["exact"]["examples"] == 0
    trained = private_training()  # the weights moved: the comparison is not between two untrained models
    assert not torch.allclose(trained.model.state_dict()["fc.weight"], single["model"]["fc.weight"], atol=1e-3)
    # the run had batches of 1 example (rank 0 had none) and of 0, so those paths were taken too
    loader = trained.loader
    sizes = [len(y) // 2 for epoch in range(CONFIG.train.epochs)
             for _, y in loader.batches(torch.Generator().manual_seed(epoch_seed(CONFIG.train.seed, epoch)))]
    assert 0 in sizes and 1 in sizes and max(sizes) >= 4


def test_noise_is_added_once_per_step_with_the_single_process_std(ranks):
    for rank in ranks:
        noise = rank["noise"]  # NOISE_STEPS x every weight
        assert noise.numel() > 150_000
        assert noise.std().item() == pytest.approx(SIGMA * CLIP, rel=0.02)  # larger if both ranks added noise
        assert abs(noise.mean().item()) < 4 * SIGMA * CLIP / noise.numel() ** 0.5
    assert torch.equal(ranks[0]["noise"], ranks[1]["noise"])  # the same step on every rank


def test_every_rank_spends_the_single_process_epsilon(ranks):
    single = noise_steps()
    expected = accounting.epsilon(sample_rate=3 / 48, noise_multiplier=SIGMA, steps=NOISE_STEPS, delta=1e-5,
                                  accountant="rdp")
    for rank in ranks:
        assert rank["steps"] == single["steps"] == NOISE_STEPS
        assert rank["epsilon"] == single["epsilon"] == pytest.approx(expected, rel=1e-9)


def test_the_ranks_shares_partition_each_poisson_batch_keeping_an_examples_views_together():
    n, views = 40, 3
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    loader = BatchLoader(Split(images=images, labels=torch.arange(n)), batch_size=3, sampling="poisson", views=views,
                         preprocess=fit_preprocessor("none", images), augment=Augment(crop_padding=1, flip=True))
    shards = [distributed.ShardedLoader(loader, rank=rank, world_size=2) for rank in range(2)]
    drawn, shares_seen = [], set()
    for seed in range(30):
        single, *shares = [source.batches(torch.Generator().manual_seed(seed)) for source in (loader, *shards)]
        for (x, y), (x0, y0), (x1, y1) in zip(single, *shares, strict=True):
            # the single-process batch, augmentation included
            assert torch.equal(torch.cat([y0, y1]), y) and torch.equal(torch.cat([x0, x1]), x)
            for share in (y0, y1):  # whole examples: each one's views adjacent, on one rank
                assert torch.equal(share, share[::views].repeat_interleave(views))
            examples = [set(y0[::views].tolist()), set(y1[::views].tolist())]
            assert not examples[0] & examples[1] and len(y[::views].unique()) == len(y) // views  # each example once
            shares_seen.add((len(examples[0]), len(examples[1])))
            drawn.append(y[::views])
    assert {(0, 0), (0, 1)} <= shares_seen  # empty shares happen and are yielded, not skipped
    # each example in the union independently with probability q = 3/40: inclusion counts over 390 batches
    counts = torch.bincount(torch.cat(drawn), minlength=n).double()
    q, batches = 3 / n, len(drawn)
    assert batches == 30 * len(loader)
    assert abs(counts.sum() - q * n * batches) < 4 * (n * batches * q * (1 - q)) ** 0.5
    assert counts.var().item() == pytest.approx(batches * q * (1 - q), rel=0.5)


def test_cifarlab_train_runs_dp_sgd_on_two_ranks_and_rank_0_reports_the_single_process_epsilon(spawned):
    run = spawned / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["sampling_rate"] == pytest.approx(8 / 48)  # 2 epochs of 1 / q steps
    expected = accounting.epsilon(sample_rate=8 / 48, noise_multiplier=1.5, steps=12, delta=summary["delta"],
                                  accountant="rdp")
    assert summary["epsilon"] == pytest.approx(expected, rel=1e-9) and summary["test_accuracy"] > 0
    assert {"best.pt", "config.yaml", "last.pt", "metrics.csv", "report.md"} <= {p.name for p in run.iterdir()}


@pytest.mark.parametrize("command", [["uncertainty", "train", "--method", "sgld"], ["prior"]])
def test_commands_that_train_in_one_process_refuse_torchrun(tmp_path, monkeypatch, capsys, command):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*command, "--out", str(tmp_path / "run")]) == 2
    assert "runs in a single process; start it without torchrun" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
