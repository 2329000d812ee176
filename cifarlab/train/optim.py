"""Optimizers and learning-rate schedules from an OptimConfig.

Schedules are one LambdaLR evaluated every step (not every epoch), so warmup and cosine are smooth and a
resumed run continues the exact same curve from the scheduler's saved step count.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from cifarlab.config import OptimConfig


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """The config's optimizer over the model's trainable parameters; with weight_decay_on "weights", parameters
    with fewer than 2 dimensions (norm layers' scales and shifts, biases) are not decayed (as in nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups: list = params
    if config.weight_decay_on == "weights":
        groups = [{"params": [p for p in params if p.ndim >= 2]},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(config: OptimConfig, *, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    total = epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        epoch = step // steps_per_epoch
        progress = (step - warmup) / max(1, total - warmup)  # 0 -> 1 after warmup
        if config.schedule == "constant":
            return 1.0
        if config.schedule == "step":
            return config.gamma ** (epoch // config.step_size)
        if config.schedule == "multistep":
            return config.gamma ** sum(epoch >= m for m in config.milestones)
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        # "onecycle": linear rise over the warmup (or the first 25% when none is set), then linear decay to 0.
        # Simpler than OneCycleLR's cosine phases and as good on CIFAR (Smith & Topin 2017; airbench uses it).
        peak = warmup or max(1, round(0.25 * total))
        if step < peak:
            return (step + 1) / peak
        return max(0.0, (total - step) / max(1, total - peak))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, *, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, epochs=epochs, steps_per_epoch=steps_per_epoch))
