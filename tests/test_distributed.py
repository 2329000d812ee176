"""Data-parallel training: rank shards partition the single-process batches; 2 gloo processes train like one."""
from __future__ import annotations


import pytest
import torch

from helpers import brightest_channel_data, free_port, join_process_group
from cifarlab.config import RunConfig
from cifarlab.data.loader import BatchLoader, TrainData
from cifarlab.models import create_model
from cifarlab.train import distributed, engine
from cifarlab.train.engine import fit


def synthetic_data() -> TrainData:
    """64 training images, global batch 16."""
    return brightest_channel_data(train=64, evals={"test": 30})


def train(batch_sizes: list[int] | None = None) -> engine.FitResult:
    """Train the tutorial LeNet; `batch_sizes` collects the size of every training batch the model sees."""
    config = RunConfig.from_dict({
        "model": {"name": "tutorial"},  # no BatchNorm: data parallelism is then exact, not approximate
        "optim": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "cosine"},
        "train": {"epochs": 3, "batch_size": 16, "device": "cpu", "progress": False, "seed": 3,
                  "precision": "fp32"},  # bf16 (auto on some CPUs) rounds the two sums differently
    })
    torch.manual_seed(0)
    model = create_model("tutorial", num_classes=3)
    if batch_sizes is not None:

        def record(module: torch.nn.Module, args: tuple[torch.Tensor]) -> None:
            if module.training:
                batch_sizes.append(len(args[0]))

        model.register_forward_pre_hook(record)
    return fit(model, data=synthetic_data(), config=config)


def test_rank_shards_partition_every_single_process_batch_with_the_same_augmentation():
    loader = synthetic_data().train
    shards = [distributed.ShardedLoader(loader, rank=rank, world_size=2) for rank in range(2)]

    def batches(source: BatchLoader):
        return source.batches(torch.Generator().manual_seed(7))

    count = 0
    for (x, y), (x0, y0), (x1, y1) in zip(batches(loader), *map(batches, shards)):
        assert len(y0) == len(y1) == 8
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        count += 1
    assert count == len(loader) == 4


def test_single_process_helpers_are_the_identity():
    loader, model = synthetic_data().train, torch.nn.Linear(2, 2)
    assert distributed.context() == distributed.Context(rank=0, world_size=1, local_rank=0)
    assert distributed.shard_loader(loader) is loader
    assert distributed.wrap_model(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)) is model
    assert distributed.all_reduce_sums(1.5, 2) == (1.5, 2)
    assert distributed.setup(torch.device("cpu")) == torch.device("cpu")



def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    join_process_group(rank, world_size, port)
    try:
        batch_sizes: list[int] = []
        result = train(batch_sizes)
        if rank == 0:
            torch.save({"history": result.history, "state": result.model.state_dict(), "batch_sizes": batch_sizes}, out)
    finally:
        distributed.cleanup()


def test_two_gloo_processes_train_like_one_process_with_the_same_global_batch(tmp_path):
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2)
    ddp = torch.load(out, weights_only=True)
    single = train()
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(ddp["state"][name], value, atol=1e-5, rtol=1e-4, msg=name)
    for row_ddp, row_single in zip(ddp["history"], single.history, strict=True):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert row_ddp[key] == pytest.approx(row_single[key], rel=1e-5), key
    assert ddp["batch_sizes"] == [8] * 12  # half of each global batch of 16, 4 steps x 3 epochs
    for row in ddp["history"]:  # the epoch's example count is summed over both ranks
        assert row["images_per_second"] * row["epoch_seconds"] == pytest.approx(64)
    assert single.history[-1]["train_loss"] < single.history[0]["train_loss"]  # it did learn
