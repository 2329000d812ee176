"""Experiment tracking in the ecosystem's format: each epoch's metrics as TensorBoard scalars in the run folder.

metrics.csv stays the run's record (`cifarlab compare` and the reports read it); the event files are a view of
the same rows for `tensorboard --logdir runs`, which then shows every run under its folder name. tensorboard is
an optional dependency (`pip install 'cifarlab[tensorboard]'`), imported only when a run asks for it.
"""
from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any, Mapping

from cifarlab.errors import ConfigError

STEP_COLUMN = "epoch"  # the x axis of every scalar, not a scalar of its own


def require_tensorboard() -> type:
    """torch's SummaryWriter class, or a ConfigError that says how to install tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it when the tensorboard package is missing
        raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard "
                          "(or pip install 'cifarlab[tensorboard]')") from None
    return SummaryWriter


class TensorBoardLog:
    """Writes metrics.csv rows as scalars tagged by column name (train_loss, test_acc, lr, epsilon, ...)."""

    def __init__(self, run_dir: str | Path) -> None:
        self._writer = require_tensorboard()(log_dir=str(run_dir))

    def log(self, row: Mapping[str, Any]) -> None:
        """One epoch's row; empty cells (None) and non-numeric values are skipped, as TensorBoard has no gaps."""
        step = int(row[STEP_COLUMN])
        for column, value in row.items():
            if column != STEP_COLUMN and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self._writer.add_scalar(column, float(value), global_step=step)
        self._writer.flush()  # a killed run keeps every finished epoch, and a live TensorBoard sees it at once

    def close(self) -> None:
        self._writer.close()
