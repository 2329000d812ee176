"""Loss-threshold membership inference: does the model tell its training images from unseen ones?

The attack (Yeom et al. 2018, "Privacy Risk in Machine Learning") guesses "member" when an example's
loss is low. Its ROC AUC over held-in (training) vs held-out (test) images is 0.5 for a model that
leaks nothing through its losses; overfit non-private models score clearly above it, and DP-SGD
bounds it: an (epsilon, delta)-DP model gives any attack TPR <= e^eps FPR + delta (Kairouz et al. 2015).
It is an empirical lower bound on leakage, not a proof of privacy.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cifarlab.errors import ConfigError
from cifarlab.hardware import resolve_device
from cifarlab.metrics import auroc
from cifarlab.train.checkpoint import load_model
from cifarlab.train.run import build_data


@dataclass
class AuditResult:
    auc: float  # ROC AUC of the score -loss, members positive
    members: int
    nonmembers: int
    member_loss: float  # mean loss on members
    nonmember_loss: float
    member_accuracy: float
    nonmember_accuracy: float


@torch.no_grad()
def per_example_losses(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """Cross-entropy (N,) and correctness (N,) of `model` in eval mode on model-ready inputs x (N, 3, H, W)."""
    was_training = model.training
    model.eval()
    losses, correct = [], []
    for xs, ys in zip(x.split(batch_size), y.split(batch_size)):
        logits = model(xs).float()
        losses.append(F.cross_entropy(logits, ys, reduction="none").cpu())
        correct.append((logits.argmax(1) == ys).cpu())
    model.train(was_training)
    return torch.cat(losses), torch.cat(correct)


def loss_threshold_audit(model: nn.Module, members: tuple[Tensor, Tensor], nonmembers: tuple[Tensor, Tensor],
                         *, batch_size: int = 500) -> AuditResult:
    """Attack AUC of -loss for (x, y) members (training examples) vs non-members."""
    member_loss, member_correct = per_example_losses(model, *members, batch_size=batch_size)
    other_loss, other_correct = per_example_losses(model, *nonmembers, batch_size=batch_size)
    return AuditResult(
        auc=auroc(-member_loss, -other_loss), members=len(member_loss), nonmembers=len(other_loss),
        member_loss=member_loss.mean().item(), nonmember_loss=other_loss.mean().item(),
        member_accuracy=member_correct.float().mean().item(), nonmember_accuracy=other_correct.float().mean().item())


def audit_checkpoint(checkpoint: str | Path, *, data_path: str | None = None, count: int = 5000, seed: int = 0,
                     device: str = "auto") -> dict[str, Any]:
    """Audit a run's checkpoint: `count` of its own training images (members) vs `count` test images.

    The members are drawn from exactly the training split the run used (its subset and validation hold-out,
    rebuilt from the checkpoint's config), without augmentation, through the checkpoint's preprocessing.
    """
    if count < 1:
        raise ConfigError(f"count must be >= 1, got {count}")
    torch_device = resolve_device(device)  # "auto": CUDA when there is one
    loaded = load_model(checkpoint, device=torch_device)
    model, preprocess, config = loaded.model, loaded.preprocess, loaded.config
    data = build_data(replace(config, data=replace(config.data, path=data_path or config.data.path),
                              train=replace(config.train, progress=False)), device=torch_device)
    generator = torch.Generator().manual_seed(seed)

    def draw(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        index = torch.randperm(len(labels), generator=generator)[:count].to(labels.device)
        return preprocess.from_uint8(images[index]), labels[index]

    test = data.evals["test"]
    result = loss_threshold_audit(model, draw(data.train.images, data.train.labels), draw(test.images, test.labels))
    return {"checkpoint": str(checkpoint), "dp": config.dp.enabled, **asdict(result)}
