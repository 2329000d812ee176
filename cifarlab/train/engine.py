"""The one training loop every feature uses (plain, DP-SGD, SGLD, continual backbones).

`fit` trains `model` on a TrainData for config.train.epochs, evaluating every epoch, writing the run folder
(metrics.csv, last.pt, best.pt, summary.json) as it goes. Features change what happens to a batch by passing
`train_step` (DP-SGD clips and noises per-sample gradients) and add per-epoch metrics or side effects with
`on_epoch_end` (epsilon spent, posterior samples); they do not get a trainer of their own.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cifarlab.config import RunConfig
from cifarlab.data.loader import BatchLoader, TrainData
from cifarlab.errors import CifarlabError
from cifarlab.hardware import autocast_for
from cifarlab.io import write_text
from cifarlab.train import distributed
from cifarlab.train.checkpoint import save_checkpoint
from cifarlab.train.optim import build_optimizer, build_scheduler

METRIC_COLUMNS = (
    "epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
    "epoch_seconds", "images_per_second",
)  # fmt: skip


class TrainingDiverged(CifarlabError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class StepResult:
    loss_sum: torch.Tensor | float  # summed (not averaged) over the batch; tensors avoid a GPU sync per step
    correct: torch.Tensor | int
    count: int


TrainStep = Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor], StepResult]
EpochHook = Callable[[int, nn.Module], "dict[str, float] | None"]


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    predictions: torch.Tensor  # (N,) on CPU
    targets: torch.Tensor  # (N,) on CPU


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, float | None]]
    summary: dict[str, Any]
    run_dir: Path | None
    extra: dict[str, Any] = field(default_factory=dict)


def standard_step(*, label_smoothing: float = 0.0, grad_clip: float | None = None) -> TrainStep:
    """Forward, cross-entropy, backward, optional global-norm clipping, optimizer step."""

    def step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        logits = model(x)  # (B, classes)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return StepResult(loss.detach() * len(y), (logits.argmax(1) == y).sum(), len(y))

    return step


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, *, autocast: Callable = contextlib.nullcontext) -> EvalResult:
    was_training = model.training
    model.eval()
    loss_sum, predictions, targets = 0.0, [], []
    for x, y in loader.batches():
        with autocast():
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        predictions.append(logits.argmax(1).cpu())
        targets.append(y.cpu())
    model.train(was_training)
    predictions, targets = torch.cat(predictions), torch.cat(targets)
    return EvalResult(
        loss=float(loss_sum) / len(targets),
        accuracy=(predictions == targets).sum().item() / len(targets),  # exact: float32 makes 9,000/10,000 < 0.9
        predictions=predictions,
        targets=targets,
    )


def epoch_seed(seed: int, epoch: int) -> int:
    """Every epoch draws from its own seed, so a run resumed at an epoch boundary replays the same batches."""
    return seed * 1_000_003 + epoch


def fit(
    model: nn.Module,
    *,
    data: TrainData,
    config: RunConfig,
    run_dir: Path | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    train_step: TrainStep | None = None,
    on_epoch_end: EpochHook | None = None,
    extra_state: dict[str, Stateful] | None = None,
    resume: dict[str, Any] | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
    eval_model: nn.Module | None = None,
    eval_from: int = 1,
) -> FitResult:
    """Train and evaluate; `resume` is a checkpoint payload (see checkpoint.read_checkpoint) to continue from.

    `eval_from` > 1 skips the evaluations of the epochs before it (their rows have no eval metrics): for benchmarks
    of long schedules whose early epochs cannot reach the threshold; a run folder needs every epoch's metrics.

    `eval_model` (e.g. an EMA copy of the weights) is what gets evaluated and saved as best.pt, when given;
    last.pt always holds the trained weights, so a resumed run continues from them.
    """
    train_cfg = config.train
    if eval_from > 1 and run_dir is not None:
        raise ValueError("fit: eval_from > 1 leaves epochs without metrics; it is for runs without a run folder")
    device = data.train.labels.device
    channels_last = train_cfg.channels_last if train_cfg.channels_last is not None else device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    if eval_model is not None:
        eval_model.to(device, memory_format=memory_format)
    optimizer = optimizer or build_optimizer(model, config.optim)
    steps_per_epoch = len(data.train)
    scheduler = build_scheduler(optimizer, config.optim, epochs=train_cfg.epochs, steps_per_epoch=steps_per_epoch)
    step = train_step or standard_step(label_smoothing=config.optim.label_smoothing, grad_clip=config.optim.grad_clip)
    forward_model = distributed.wrap_model(model)  # DDP under torchrun; `model` stays the unwrapped one we save
    forward_model = torch.compile(forward_model) if train_cfg.compile else forward_model
    train_loader = distributed.shard_loader(data.train)  # this rank's slice of every batch
    autocast = autocast_for(device, train_cfg.precision)
    extra_state = extra_state or {}

    history: list[dict[str, float | None]] = []
    start_epoch, best_score, train_seconds = 0, -math.inf, 0.0
    if resume is not None:
        model.load_state_dict(resume["model_state"])
        optimizer.load_state_dict(resume["optimizer_state"])
        scheduler.load_state_dict(resume["scheduler_state"])
        for name, obj in extra_state.items():
            obj.load_state_dict(resume["extra_state"][name])
        history = list(resume["history"])
        start_epoch, best_score, train_seconds = resume["epoch"] + 1, resume["best_score"], resume["train_seconds"]

    # Without a validation set the test set must not pick the epoch (that would be optimistic): the last one is "best".
    selection = "val_acc" if "val" in data.evals else "last_epoch"
    bar = tqdm(
        total=(train_cfg.epochs - start_epoch) * steps_per_epoch,
        disable=not (train_cfg.progress and distributed.context().is_main),
        unit="batch",
        dynamic_ncols=True,
    )
    for epoch in range(start_epoch, train_cfg.epochs):
        torch.manual_seed(epoch_seed(train_cfg.seed, epoch))  # dropout, stochastic depth
        generator = torch.Generator(device=device).manual_seed(epoch_seed(train_cfg.seed, epoch))
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        for x, y in train_loader.batches(generator):
            x = x.contiguous(memory_format=memory_format)
            with autocast():
                result = step(forward_model, optimizer, x, y)
            scheduler.step()
            loss_sum, correct, seen = loss_sum + result.loss_sum, correct + result.correct, seen + result.count
            bar.update()
            if bar.n % 20 == 0 and train_cfg.progress:  # reading the sums syncs the GPU: not every step
                bar.set_postfix(
                    epoch=f"{epoch + 1}/{train_cfg.epochs}",
                    loss=f"{float(loss_sum) / max(1, seen):.3f}",
                    acc=f"{float(correct) / max(1, seen):.3f}",
                    img_s=f"{seen / (time.perf_counter() - start):.0f}",
                    refresh=False,
                )
        if device.type == "cuda":
            torch.cuda.synchronize()
        loss_sum, correct, seen = distributed.all_reduce_sums(loss_sum, correct, seen)
        epoch_seconds = time.perf_counter() - start
        train_seconds += epoch_seconds
        train_loss = float(loss_sum) / max(1, seen)
        if not math.isfinite(train_loss):
            bar.close()
            raise TrainingDiverged(
                f"training loss became {train_loss} in epoch {epoch + 1}; "
                f"{'the last good checkpoint is ' + str(run_dir / 'last.pt') if run_dir else 'nothing was saved'}. "
                "Lower --lr, add warmup (--warmup-epochs) or gradient clipping (--grad-clip)."
            )
        row: dict[str, float | None] = dict.fromkeys(METRIC_COLUMNS)
        row.update(
            epoch=epoch + 1,
            lr=lr,
            train_loss=train_loss,
            train_acc=float(correct) / max(1, seen),
            epoch_seconds=epoch_seconds,
            images_per_second=seen / epoch_seconds,
        )
        for name, loader in data.evals.items() if epoch + 1 >= eval_from else ():
            result = evaluate(eval_model or model, loader, autocast=autocast)
            row[f"{name}_loss"], row[f"{name}_acc"] = result.loss, result.accuracy
        if on_epoch_end is not None:
            row.update(on_epoch_end(epoch, model) or {})
        history.append(row)
        bar.set_postfix(
            epoch=f"{epoch + 1}/{train_cfg.epochs}",
            loss=f"{train_loss:.3f}",
            acc=f"{row['train_acc']:.3f}",
            **{name: f"{row[f'{name}_acc']:.3f}" for name in data.evals if row.get(f"{name}_acc") is not None},
            img_s=f"{row['images_per_second']:.0f}",
        )

        if run_dir is not None:
            score = row["val_acc"] if selection == "val_acc" else epoch
            improved = score > best_score
            best_score = max(best_score, score)
            state = dict(
                config=config.to_dict(),
                preprocess=data.preprocess.state(),
                classes=list(data.classes),
                epoch=epoch,
                **(checkpoint_extra or {}),
            )
            if improved:
                save_checkpoint(run_dir / "best.pt", **state, model_state=(eval_model or model).state_dict())
            save_checkpoint(
                run_dir / "last.pt",
                **state,
                model_state=model.state_dict(),
                optimizer_state=optimizer.state_dict(),
                scheduler_state=scheduler.state_dict(),
                extra_state={name: obj.state_dict() for name, obj in extra_state.items()},
                history=history,
                best_score=best_score,
                train_seconds=train_seconds,
            )
            write_metrics_csv(run_dir / "metrics.csv", history)
    bar.close()
    summary = {
        "selection": selection,
        "train_seconds": train_seconds,
        "images_per_second": sum(r["images_per_second"] for r in history) / len(history),
    }
    return FitResult(model=model, history=history, summary=summary, run_dir=run_dir)


def write_metrics_csv(path: Path, history: list[dict[str, float | None]]) -> None:
    columns = list(METRIC_COLUMNS) + sorted({key for row in history for key in row} - set(METRIC_COLUMNS))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in columns})
    write_text(path, buffer.getvalue())
