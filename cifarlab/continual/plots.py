"""Figure of a continual run: accuracy on all classes, on seen classes and novelty AUROC per step, one line per method."""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from cifarlab.io import atomic_write

PANELS = (("accuracy_per_step", "accuracy, all classes (%)"),
          ("seen_accuracy_per_step", "accuracy, seen classes (%)"),
          ("novelty_auroc_per_step", "novelty AUROC, unseen classes (%)"))


def plot_accuracy_per_step(methods: Mapping[str, Mapping[str, Any]], classes_learned: list[int],
                           path: str | Path, *, title: str | None = None) -> Path:
    """One panel per metric of `PANELS`, x = number of classes learned after each step.
    Missing values (None/nan: a method not run at that step, AUROC with nothing unseen) are skipped."""
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    axes = fig.subplots(1, len(PANELS))
    for i, (name, result) in enumerate(methods.items()):
        style = {"label": name, "color": f"C{i % 10}", "linestyle": "-" if i < 10 else "--"}
        for ax, (key, _) in zip(axes, PANELS):
            points = [(x, 100 * y) for x, y in zip(classes_learned, result.get(key) or [])
                      if y is not None and not math.isnan(y)]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", markersize=4, **style)
    for ax, (_, label) in zip(axes, PANELS):
        ax.set_xlabel("classes learned")
        ax.set_ylabel(label)
        ax.set_xticks(classes_learned)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    # format is explicit because atomic_write's temporary file ends in .tmp
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
