"""The one training loop every feature uses (plain, DP-SGD, SGLD, SGLD-DP, continual baselines).

`fit` trains `model` on a TrainData for config.train.epochs, evaluating the validation split (if any) after every
epoch and the test split after every config.train.eval_every-th epoch and the last, writing the run folder
(metrics.csv, last.pt, best.pt) as it goes; the rows of epochs not evaluated have empty test cells. What a batch
does to the model is the training variant's business (cifarlab.train.variant): DP-SGD clips and noises
per-example gradients, SGLD adds Langevin noise; the loop only schedules the learning rate, seeds each epoch,
evaluates and checkpoints.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cifarlab.config import RunConfig
from cifarlab.data.loader import BatchLoader, TrainData
from cifarlab.errors import CifarlabError
from cifarlab.hardware import autocast_for
from cifarlab.io import write_csv
from cifarlab.train import distributed
from cifarlab.train.checkpoint import save_checkpoint
from cifarlab.train.optim import build_optimizer, build_scheduler
from cifarlab.train.tracking import TensorBoardLog
from cifarlab.train.variant import PlainTraining, TrainingVariant

METRIC_COLUMNS = (
    "epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
    "epoch_seconds", "images_per_second",
)  # fmt: skip


class TrainingDiverged(CifarlabError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    predictions: torch.Tensor  # (N,) on CPU
    targets: torch.Tensor  # (N,) on CPU


@dataclass
class FitResult:
    model: nn.Module  # the trained weights (last epoch)
    history: list[dict[str, float | None]]  # one metrics row per epoch, resumed epochs included
    run_dir: Path | None
    selection: str  # how best.pt was chosen: "val_acc", or "last_epoch" without a validation split
    train_seconds: float
    images_per_second: float  # mean over the epochs


def plain_training(model: nn.Module, config: RunConfig) -> PlainTraining:
    """The default variant: the config's optimizer over the model's trainable parameters."""
    return PlainTraining(build_optimizer(model, config.optim), label_smoothing=config.optim.label_smoothing,
                         grad_clip=config.optim.grad_clip)


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


def evaluates(epoch: int, *, epochs: int, every: int) -> bool:
    """Whether epoch `epoch` (1-based) of `epochs` is evaluated on the test set under train.eval_every = `every`:
    every k-th and the last; 0: the last only."""
    return epoch == epochs or (every > 0 and epoch % every == 0)


def epoch_seed(seed: int, epoch: int) -> int:
    """Every epoch draws from its own seed, so a run resumed at an epoch boundary replays the same batches."""
    return seed * 1_000_003 + epoch


def fit(model: nn.Module, *, data: TrainData, config: RunConfig, variant: TrainingVariant | None = None,
        run_dir: Path | None = None, resume: dict[str, Any] | None = None, eval_from: int = 1) -> FitResult:
    """Train with `variant` (default: plain training); `resume` is a last.pt payload (checkpoint.read_checkpoint).

    `eval_from` > 1 also skips the evaluations of the epochs before it (their rows have no eval metrics): for
    benchmarks of long schedules whose early epochs cannot reach the threshold; a run folder's cadence is
    config.train.eval_every alone. Evaluation time is not training time (FitResult.train_seconds), and evaluation
    draws no random numbers training uses (every epoch reseeds), so the cadence leaves the trained weights alone.
    """
    if eval_from > 1 and run_dir is not None:
        raise ValueError("fit: eval_from > 1 leaves epochs without metrics; it is for runs without a run folder")
    loop = _Loop(model, data=data, config=config, variant=variant, run_dir=run_dir)
    if resume is not None:
        loop.restore(resume)
    bar = tqdm(total=(config.train.epochs - loop.start_epoch) * len(data.train), unit="batch", dynamic_ncols=True,
               disable=not (config.train.progress and distributed.context().is_main))
    for epoch in range(loop.start_epoch, config.train.epochs):
        row = loop.train_epoch(epoch, bar)
        due = evaluates(epoch + 1, epochs=config.train.epochs, every=config.train.eval_every)
        for name, loader in data.evals.items():
            # val picks best.pt: evaluated after every epoch, so that the cadence never changes the selected epoch
            if epoch + 1 < eval_from or not (due or name == "val"):
                continue
            result = evaluate(loop.eval_model, loader, autocast=loop.autocast)
            row[f"{name}_loss"], row[f"{name}_acc"] = result.loss, result.accuracy
        row.update(loop.variant.on_epoch_end(epoch, loop.model))
        loop.history.append(row)
        bar.set_postfix(epoch=f"{epoch + 1}/{config.train.epochs}", loss=f"{row['train_loss']:.3f}",
                        acc=f"{row['train_acc']:.3f}", img_s=f"{row['images_per_second']:.0f}",
                        **{name: f"{row[f'{name}_acc']:.3f}" for name in data.evals
                           if row.get(f"{name}_acc") is not None})
        if run_dir is not None:
            loop.save(epoch)
    bar.close()
    if loop.tensorboard is not None:
        loop.tensorboard.close()
    return FitResult(model=loop.model, history=loop.history, run_dir=run_dir, selection=loop.selection,
                     train_seconds=loop.train_seconds,
                     images_per_second=sum(r["images_per_second"] for r in loop.history) / len(loop.history))


class _Loop:
    """The state `fit` carries from epoch to epoch, and the work of one epoch."""

    def __init__(self, model: nn.Module, *, data: TrainData, config: RunConfig, variant: TrainingVariant | None,
                 run_dir: Path | None) -> None:
        device = data.train.labels.device
        channels_last = config.train.channels_last if config.train.channels_last is not None else device.type == "cuda"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format)
        variant = variant or plain_training(self.model, config)  # built on the device, as the variants given are
        if variant.eval_model is not None:
            variant.eval_model.to(device, memory_format=self.memory_format)
        self.eval_model = variant.eval_model or self.model  # evaluated and saved as best.pt
        self.data, self.config, self.variant, self.run_dir, self.device = data, config, variant, run_dir, device
        self.scheduler = build_scheduler(variant.optimizer, config.optim, epochs=config.train.epochs,
                                         steps_per_epoch=len(data.train))
        # DDP under torchrun (not for an optimizer that sums over the ranks itself); `model` stays the one we save
        forward_model = distributed.wrap_model(model, optimizer=variant.optimizer)
        self.forward_model = torch.compile(forward_model) if config.train.compile else forward_model
        self.train_loader = distributed.shard_loader(data.train)  # this rank's slice of every batch
        self.autocast = autocast_for(device, config.precision_on(device).precision)
        self.history: list[dict[str, float | None]] = []
        self.start_epoch, self.best_score, self.train_seconds = 0, -math.inf, 0.0
        # Without a validation set the test set must not pick the epoch (that would be optimistic): the last is "best".
        self.selection = "val_acc" if "val" in data.evals else "last_epoch"
        # A view of metrics.csv: written where the run folder is (rank 0), checked for tensorboard before epoch 1.
        self.tensorboard = TensorBoardLog(run_dir) if config.train.tensorboard and run_dir is not None else None

    def restore(self, resume: dict[str, Any]) -> None:
        self.model.load_state_dict(resume["model_state"])
        self.variant.optimizer.load_state_dict(resume["optimizer_state"])
        self.scheduler.load_state_dict(resume["scheduler_state"])
        self.variant.load_state_dict(resume["variant_state"])
        self.history = list(resume["history"])
        self.start_epoch, self.best_score = resume["epoch"] + 1, resume["best_score"]
        self.train_seconds = resume["train_seconds"]

    def train_epoch(self, epoch: int, bar: tqdm) -> dict[str, float | None]:
        """Train one epoch; its metrics row, without evaluations."""
        seed = epoch_seed(self.config.train.seed, epoch)
        torch.manual_seed(seed)  # dropout, stochastic depth
        generator = torch.Generator(device=self.device).manual_seed(seed)
        self.model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        start = time.perf_counter()
        lr = self.variant.optimizer.param_groups[0]["lr"]
        for x, y in self.train_loader.batches(generator, epoch):
            with self.autocast():
                result = self.variant.step(self.forward_model, x.contiguous(memory_format=self.memory_format), y)
            self.scheduler.step()
            loss_sum, correct, seen = loss_sum + result.loss_sum, correct + result.correct, seen + result.count
            bar.update()
            if bar.n % 20 == 0 and self.config.train.progress:  # reading the sums syncs the GPU: not every step
                bar.set_postfix(epoch=f"{epoch + 1}/{self.config.train.epochs}", refresh=False,
                                loss=f"{float(loss_sum) / max(1, seen):.3f}",
                                acc=f"{float(correct) / max(1, seen):.3f}",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}")
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        loss_sum, correct, seen = distributed.all_reduce_sums(loss_sum, correct, seen)
        epoch_seconds = time.perf_counter() - start
        self.train_seconds += epoch_seconds
        train_loss = float(loss_sum) / max(1, seen)
        if not math.isfinite(train_loss):
            bar.close()
            saved = f"the last good checkpoint is {self.run_dir / 'last.pt'}" if self.run_dir else "nothing was saved"
            raise TrainingDiverged(f"training loss became {train_loss} in epoch {epoch + 1}; {saved}. Lower --lr, add "
                                   "warmup (--warmup-epochs) or gradient clipping (--grad-clip).")
        row: dict[str, float | None] = dict.fromkeys(METRIC_COLUMNS)
        row.update(epoch=epoch + 1, lr=lr, train_loss=train_loss, train_acc=float(correct) / max(1, seen),
                   epoch_seconds=epoch_seconds, images_per_second=seen / epoch_seconds)
        return row

    def save(self, epoch: int) -> None:
        """best.pt when the epoch is the best so far, last.pt (everything a resume needs) and metrics.csv."""
        row = self.history[-1]
        score = row["val_acc"] if self.selection == "val_acc" else epoch
        improved = score > self.best_score
        self.best_score = max(self.best_score, score)
        state = dict(config=self.config.to_dict(), preprocess=self.data.preprocess.state(),
                     classes=list(self.data.classes), epoch=epoch)
        if improved:
            save_checkpoint(self.run_dir / "best.pt", **state, model_state=self.eval_model.state_dict())
        save_checkpoint(self.run_dir / "last.pt", **state, model_state=self.model.state_dict(),
                        optimizer_state=self.variant.optimizer.state_dict(),
                        scheduler_state=self.scheduler.state_dict(), variant_state=self.variant.state_dict(),
                        history=self.history, best_score=self.best_score, train_seconds=self.train_seconds)
        write_metrics_csv(self.run_dir / "metrics.csv", self.history)
        if self.tensorboard is not None:
            self.tensorboard.log(row)


def write_metrics_csv(path: Path, history: list[dict[str, float | None]]) -> None:
    columns = list(METRIC_COLUMNS) + sorted({key for row in history for key in row} - set(METRIC_COLUMNS))
    write_csv(path, history, columns)
