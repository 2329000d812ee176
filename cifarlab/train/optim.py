"""Optimizers and learning-rate schedules from an OptimConfig.

Schedules are one LambdaLR evaluated every step (not every epoch), so warmup and cosine are smooth and a
resumed run continues the exact same curve from the scheduler's saved step count.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from cifarlab.config import OptimConfig
from cifarlab.errors import ConfigError


# Coefficients of the quintic Newton-Schulz iteration of Muon (Jordan et al. 2024, "Muon: an optimizer for hidden
# layers"): chosen for a steep slope at 0, so five steps push every singular value into about [0.7, 1.2] rather
# than converging exactly to 1, which the update does not need.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 5


def orthogonalize(update: Tensor) -> Tensor:
    """An approximation of U V^T for update = U S V^T, the matrix flattened to (out, rest); same shape and dtype.
    Written by hand: torch.optim.Muon (recent torch only; cifarlab supports torch >= 2.4) refuses conv filters,
    which are exactly the weights Muon is meant for here."""
    matrix = update.reshape(len(update), -1).float()
    wide = matrix.shape[0] <= matrix.shape[1]
    x = matrix if wide else matrix.T  # X X^T is then the smaller Gram matrix
    x = x / (x.norm() + 1e-7)  # singular values <= 1: the iteration converges from there
    a, b, c = NEWTON_SCHULZ
    for _ in range(NEWTON_SCHULZ_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).reshape(update.shape).to(update.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for groups marked `muon: True` (hidden conv and linear weights), SGD with momentum for the others.

    Both keep a momentum buffer m = momentum * m + g (g with L2 weight decay added, as torch's SGD does) and step
    along m, or along g + momentum * m with nesterov. A Muon group replaces that direction by its orthogonalised
    version, scaled by sqrt(max(1, out / in)) so that every layer moves by a similar RMS whatever its shape (as in
    Jordan et al.); the others step like torch.optim.SGD. A group marked `normalize: True` is rescaled after every
    step to Frobenius norm sqrt(out), as airbench94_muon does: where a normalisation layer follows, the weight's scale
    does not change the function, but it divides the effective step, which would otherwise shrink as fixed-size
    orthogonal steps grow the weight. One optimizer, so the engine's schedule, checkpoint and resume treat it as any
    other."""

    def __init__(self, params, *, lr: float, momentum: float, nesterov: bool, weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov,
                                  "weight_decay": weight_decay, "muon": False, "normalize": False})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()  # the first step starts the buffer at g, as SGD does
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                buffer = state["momentum_buffer"]
                direction = grad.add(buffer, alpha=group["momentum"]) if group["nesterov"] else buffer
                if group["muon"]:
                    direction = orthogonalize(direction) * max(1.0, len(p) / p[0].numel()) ** 0.5
                p.add_(direction, alpha=-group["lr"])
                if group["normalize"]:
                    p.mul_(len(p) ** 0.5 / p.norm().clamp_min(1e-12))
        return loss


def muon_groups(model: nn.Module, config: OptimConfig) -> list[dict]:
    """Hidden weights (>= 2 dims, not the classifier head) on Muon at `muon_lr`; the head, norm layers and biases
    on SGD at `lr`: Muon is meant for hidden layers, and a vector has nothing to orthogonalise."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = [p for p in params if p.ndim >= 2 and id(p) not in head_ids]
    if not hidden:
        raise ConfigError("optim.optimizer muon needs hidden weight matrices or conv filters to orthogonalise; this "
                          "model has none outside its classifier head (use sgd)")
    others = [p for p in params if p.ndim < 2 or id(p) in head_ids]
    no_decay = 0.0 if config.weight_decay_on == "weights" else config.weight_decay
    hidden_group = {"params": hidden, "muon": True, "lr": config.muon_lr}
    if config.muon_momentum is not None:
        hidden_group["momentum"] = config.muon_momentum
    if config.muon_normalize:  # the norm is held fixed, so decay would only tilt the direction
        hidden_group.update(normalize=True, weight_decay=0.0)
    return [hidden_group,
            {"params": [p for p in others if p.ndim >= 2]},
            {"params": [p for p in others if p.ndim < 2], "weight_decay": no_decay}]


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """The config's optimizer over the model's trainable parameters; with weight_decay_on "weights", parameters
    with fewer than 2 dimensions (norm layers' scales and shifts, biases) are not decayed (as in nanoGPT)."""
    if config.optimizer == "muon":
        return Muon(muon_groups(model, config), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                    weight_decay=config.weight_decay)
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
