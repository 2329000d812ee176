"""Time-to-accuracy benchmark: how long a recipe trains until its test accuracy first reaches each threshold.

    cifarlab bench --recipe fast-cpu --seeds 3 --thresholds 0.85,0.90 --csv bench.csv --data ...

Each seed trains the recipe once (no run folder), evaluating the test set as config.train.eval_every says
(`cifarlab bench` sets 1, every epoch, unless --eval-every is given; with k > 1 a threshold is found only at the
evaluated epochs, an upper bound). The time to a threshold is the wall time of a run that stops at the first
epoch whose test accuracy reaches it:

    building the model and its data-dependent init (e.g. fast's whitening)
    + training time of epochs 1..e (torch.compile, when asked for, happens inside epoch 1)
    + the one evaluation of epoch e, needed to know the threshold was reached.

Evaluations of earlier epochs are excluded (such a run would not need them), and so is loading the dataset.
`eval_from` skips the evaluations before that epoch (wall time, for long schedules): a threshold first met
earlier is then reported at `eval_from` or later, an upper bound on the time.
As in DAWNBench, "reached at epoch e" is read from a run scheduled for all its epochs (whose learning rate has
not yet decayed at e < last epoch). Peak memory: torch.cuda.max_memory_allocated on CUDA (reset
per seed); on CPU the process's peak resident set size (getrusage), which includes the dataset and every
earlier seed of the process.
"""
from __future__ import annotations

import csv
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from cifarlab.config import RunConfig, merge
from cifarlab.data.loader import BatchLoader
from cifarlab.errors import ConfigError
from cifarlab.io import write_csv
from cifarlab.report.run_report import format_table
from cifarlab.hardware import machine_name, resolve_device
from cifarlab.train.run import build_data, build_run

COLUMNS = (
    "recipe", "model", "model_args", "threshold", "eval_from", "seeds", "reached", "seconds_mean", "seconds_min",
    "seconds_max", "epoch_mean", "final_acc_mean", "final_acc_min", "final_acc_max", "images_per_second", "peak_memory_mb", "device",
    "epsilon", "epochs", "batch_size", "data_source", "torch", "date",
    "eval_every", "machine", "threads", "timed",
)  # fmt: skip
TIMED = "setup+train+eval"  # the `timed` column of time_to_accuracy's rows: what seconds_* count (module docstring)


class TimedLoader(BatchLoader):
    """A BatchLoader that records the wall time of every full pass over it (one evaluation each)."""

    def __init__(self, loader: BatchLoader) -> None:
        vars(self).update(vars(loader))  # the same tensors and preprocessing
        self.seconds: list[float] = []

    def batches(self, generator: torch.Generator | None = None,
                epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start = time.perf_counter()
        yield from super().batches(generator, epoch)
        if self.labels.device.type == "cuda":
            torch.cuda.synchronize()  # the last batch's forward has been queued, not finished
        self.seconds.append(time.perf_counter() - start)


def crossing(test_acc: Sequence[float | None], *, epoch_seconds: Sequence[float],
             eval_seconds: Sequence[float | None], setup_seconds: float, threshold: float) -> tuple[int, float] | None:
    """(epoch, seconds) of the first epoch (1-based) with test accuracy >= threshold, timed as the module says;
    epochs that were not evaluated have accuracy None."""
    for epoch, accuracy in enumerate(test_acc, start=1):
        if accuracy is not None and accuracy >= threshold:
            return epoch, setup_seconds + sum(epoch_seconds[:epoch]) + eval_seconds[epoch - 1]
    return None


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # Unix only; kilobytes on Linux

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_once(config: RunConfig, *, eval_from: int = 1) -> dict[str, Any]:
    """One run without a run folder: per-epoch test accuracy (None where not evaluated: before `eval_from`, or
    between train.eval_every's epochs) and timings, images/s, images trained on, precision, peak memory."""
    device = resolve_device(config.train.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    data = build_data(config, device=device)
    start = time.perf_counter()
    run = build_run(config, data=data)  # as `cifarlab train`, --dp included
    test = TimedLoader(run.data.evals["test"])
    run.data = replace(run.data, evals={**run.data.evals, "test": test})
    setup_seconds = time.perf_counter() - start
    result = run.fit(eval_from=eval_from)
    passes = iter(test.seconds)  # one per evaluated epoch, in order
    return {
        "test_acc": [row["test_acc"] for row in result.history],
        "epoch_seconds": [row["epoch_seconds"] for row in result.history],
        "eval_seconds": [None if row["test_acc"] is None else next(passes) for row in result.history],
        "setup_seconds": setup_seconds,
        "images_per_second": result.images_per_second,
        "train_images": round(sum(row["images_per_second"] * row["epoch_seconds"] for row in result.history)),
        "peak_memory_mb": peak_memory_mb(device),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "machine": machine_name(device),
        "precision": config.precision_on(device).precision,
        "data_source": data.source,
        "epsilon": run.variant.epsilon() if config.dp.enabled else None,
    }


def time_to_accuracy(config: RunConfig, *, thresholds: Sequence[float], seeds: Sequence[int], eval_from: int = 1,
                     on_run: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train `config` once per seed; one row per threshold with the time to reach it over the seeds (mean/min/max).

    seconds_* and epoch_mean are over the seeds that reached the threshold (`reached` says how many; None if none).
    `on_run(seed, run)` sees each seed's `train_once` result as soon as it is done (runs take minutes).
    """
    if not thresholds or not seeds:
        raise ConfigError("bench needs at least one threshold and one seed")
    if any(not 0 <= t <= 1 for t in thresholds):
        raise ConfigError(f"accuracy thresholds are fractions in [0, 1], e.g. 0.94; got {list(thresholds)}")
    if not 1 <= eval_from <= config.train.epochs:
        raise ConfigError(f"bench: eval-from must be an epoch in 1..{config.train.epochs} (the recipe's epochs), "
                          f"got {eval_from}")
    runs = []
    for seed in seeds:
        seeded = RunConfig.from_dict(merge(config.to_dict(), {"train": {"seed": seed}}), source="bench")
        runs.append(train_once(seeded, eval_from=eval_from))
        if on_run is not None:
            on_run(seed, runs[-1])
    final = [run["test_acc"][-1] for run in runs]
    rows = []
    for threshold in thresholds:
        hits = [crossing(run["test_acc"], epoch_seconds=run["epoch_seconds"], eval_seconds=run["eval_seconds"],
                         setup_seconds=run["setup_seconds"], threshold=threshold) for run in runs]
        hits = [hit for hit in hits if hit is not None]
        seconds = [s for _, s in hits]
        rows.append({
            "recipe": config.recipe,
            "model": config.model.name,
            "model_args": json.dumps(config.model.args, sort_keys=True),
            "threshold": threshold,
            "eval_from": eval_from,
            "seeds": " ".join(map(str, seeds)),
            "reached": len(hits),
            "seconds_mean": statistics.fmean(seconds) if hits else None,
            "seconds_min": min(seconds, default=None),
            "seconds_max": max(seconds, default=None),
            "epoch_mean": statistics.fmean(e for e, _ in hits) if hits else None,
            "final_acc_mean": statistics.fmean(final),
            "final_acc_min": min(final),
            "final_acc_max": max(final),
            "images_per_second": statistics.fmean(run["images_per_second"] for run in runs),
            "peak_memory_mb": max(run["peak_memory_mb"] for run in runs),
            "device": runs[0]["device"],
            "epsilon": runs[0]["epsilon"],  # the same for every seed: it depends on the schedule alone
            "epochs": config.train.epochs,
            "batch_size": config.train.batch_size,
            "data_source": runs[0]["data_source"],
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "eval_every": config.train.eval_every,
            "machine": runs[0]["machine"],
            "threads": torch.get_num_threads(),
            "timed": TIMED,
        })
    return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a table of the headline columns (the CSV has them all)."""
    shown = ("recipe", "threshold", "reached", "seconds_mean", "seconds_min", "seconds_max", "epoch_mean",
             "final_acc_mean", "images_per_second", "peak_memory_mb", "device")
    return format_table([{**row, "reached": f"{row['reached']}/{len(row['seeds'].split())}"} for row in rows], shown)


def append_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Add `rows` to the CSV at `path` (created if missing), rewriting it atomically; extra old columns are kept."""
    path = Path(path)
    old: list[dict[str, str]] = []
    columns = list(COLUMNS)
    if path.exists():
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            old = list(reader)
            columns += [c for c in reader.fieldnames or () if c not in columns]
    return write_csv(path, [*old, *rows], columns)
