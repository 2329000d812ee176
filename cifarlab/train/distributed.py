"""Data-parallel training over several processes with PyTorch DistributedDataParallel, started by torchrun.

    torchrun --nproc_per_node=4 -m cifarlab train --recipe fast-gpu94 --data ...

torchrun starts one process per GPU (or CPU worker) and sets RANK, WORLD_SIZE and LOCAL_RANK. Every process holds
the whole dataset and draws the same epoch permutation and augmentation from the shared epoch seed; each trains on
its slice of every global batch (batch_size / world_size examples) and DDP averages the gradients, so the weights
follow single-process training with the same global batch: exactly (up to float summation order) for models
without BatchNorm, closely with it (BN normalises over each rank's slice). Per-epoch sums (loss, correct, count)
are added over ranks; only rank 0 writes files and shows progress.

DP-SGD runs the same way with Poisson batches: every rank draws the same Poisson mask and keeps its slice of the
sampled examples (ShardedLoader), and the DP optimizer (cifarlab.privacy.dpsgd.ClippedSumOptimizer) sums the
clipped gradient sums over the ranks itself, adding the noise once, so its model is not wrapped in DDP.

The engine calls `shard_loader`, `wrap_model` and `all_reduce_sums`; each is the identity in a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from cifarlab.data.loader import BatchLoader
from cifarlab.errors import ConfigError


@dataclass(frozen=True)
class Context:
    """This process's place in the group (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context() -> Context:
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return Context()


def setup(device: torch.device) -> torch.device:
    """Join the process group when torchrun started us (WORLD_SIZE > 1); return this process's device.

    NCCL on CUDA (each process takes GPU LOCAL_RANK), gloo on CPU. Without torchrun: `device`, nothing else.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"distributed training runs on CUDA (nccl) or CPU (gloo), not on {device.type}")
    if not dist.is_initialized():  # joined already by an earlier run in this process (e.g. bench's seeds)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def require_single_process(command: str) -> None:
    """ConfigError when torchrun started several processes for a command that trains in one: each would train
    alone and write the same files."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"{command} runs in a single process; start it without torchrun")


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ShardedLoader(BatchLoader):
    """A BatchLoader yielding only this rank's slice of every global batch, cut between examples: all `views`
    augmented rows of an example go to the same rank.

    Each rank draws the whole global batch from the shared epoch generator (the engine seeds it alike on every
    rank), augments it and keeps its slice, so the random draws match a single process example for example;
    crop and flip of a batch cost little next to the model's forward and backward. With Poisson sampling this makes
    the union of the ranks' shares a Poisson sample at rate q: it is exactly the single-process batch, in which
    each example joined independently with probability q, and the slices partition it by position, so each sampled
    example is trained on by exactly one rank. A rank's share may then be empty (DP-SGD adds only its part of the
    sum, nothing); Poisson batches are never skipped, as the accountant counts each one.
    """

    def __init__(self, loader: BatchLoader, *, rank: int, world_size: int) -> None:
        vars(self).update(vars(loader))  # the same images, preprocessing and augmentation; no tensor is copied
        self.rank, self.world_size = rank, world_size

    def batches(self, generator: torch.Generator | None = None,
                epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in super().batches(generator, epoch):
            examples = len(y) // self.views
            # DDP needs an example on every rank: a last shuffled batch too small for that is skipped
            if examples < self.world_size and self.sampling != "poisson":
                continue
            start, stop = (examples * r // self.world_size * self.views for r in (self.rank, self.rank + 1))
            yield x[start:stop], y[start:stop]


def shard_loader(loader: BatchLoader) -> BatchLoader:
    ctx = context()
    if ctx.world_size == 1:
        return loader
    if loader.sampling != "poisson" and loader.batch_size % ctx.world_size:
        raise ConfigError(f"train.batch_size {loader.batch_size} must be divisible by the {ctx.world_size} processes")
    return ShardedLoader(loader, rank=ctx.rank, world_size=ctx.world_size)


def wrap_model(model: nn.Module, *, optimizer: torch.optim.Optimizer) -> nn.Module:
    """DistributedDataParallel around `model` (already on this process's device) when there are several ranks,
    unless `optimizer` sums the gradients over the ranks itself (a true `reduces_gradients` attribute: DP-SGD's,
    which must add its noise to the sum over all ranks once): that model only gets rank 0's weights and buffers.

    DDP's defaults: rank 0's weights and buffers are copied to all ranks at the start, and its buffers (BatchNorm
    running statistics) before every forward, so every rank evaluates the same model.
    """
    ctx = context()
    if ctx.world_size == 1:
        return model
    if getattr(optimizer, "reduces_gradients", False):
        for tensor in model.state_dict().values():  # as DDP copies them: every rank then takes the same steps
            dist.broadcast(tensor, src=0)
        return model
    device = next(model.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_sums(*values: torch.Tensor | float) -> tuple[torch.Tensor | float, ...]:
    """Each value summed over the ranks (as floats); in a single process the values themselves, untouched."""
    if context().world_size == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    sums = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    return tuple(sums.tolist())
