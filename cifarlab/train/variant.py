"""How a batch trains the model: the one interface through which plain training, DP-SGD, SGLD and SGLD-DP plug
into the engine (`cifarlab.train.engine.fit`), which knows nothing of any of them.

A variant owns its optimizer and whatever state it adds to a run (an accountant, a noise generator, posterior
samples); `state_dict` carries all of it, so a run resumed from last.pt continues exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class StepResult:
    loss_sum: torch.Tensor | float  # summed (not averaged) over the batch; tensors avoid a GPU sync per step
    correct: torch.Tensor | int
    count: int


class TrainingVariant(Protocol):
    """What `fit` asks of a training variant. `eval_model`: the weights to evaluate and save as best.pt (e.g. an
    EMA copy), or None for the trained model itself."""

    optimizer: torch.optim.Optimizer

    @property
    def eval_model(self) -> nn.Module | None: ...

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """Train on one batch x (B, ...), y (B,)."""

    def on_epoch_end(self, epoch: int, model: nn.Module) -> dict[str, float]:
        """Extra columns of the epoch's metrics row (e.g. epsilon spent)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StatelessVariant:
    """The parts of a variant that adds no state to a run and evaluates the trained model itself."""

    eval_model = None

    def on_epoch_end(self, epoch: int, model: nn.Module) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class PlainTraining(StatelessVariant):
    """Forward, cross-entropy (with label smoothing), backward, optional global-norm clipping, optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, label_smoothing: float = 0.0,
                 grad_clip: float | None = None) -> None:
        self.optimizer = optimizer
        self.label_smoothing = label_smoothing
        self.grad_clip = grad_clip

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        logits = model(x)  # (B, classes)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        self.optimizer.step()
        return StepResult(loss.detach() * len(y), (logits.argmax(1) == y).sum(), len(y))
