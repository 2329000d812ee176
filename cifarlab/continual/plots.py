"""Figures of a continual run: accuracy on all classes, on seen classes and novelty AUROC per step, one line per
method (`plot_accuracy_per_step`); novelty AUROC and FPR at 95% TPR per step, one line per score, one column per
method (`plot_novelty_per_step`)."""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure

from cifarlab.io import atomic_write

PANELS = (("accuracy_per_step", "accuracy, all classes (%)"),
          ("seen_accuracy_per_step", "accuracy, seen classes (%)"),
          ("novelty_auroc_per_step", "novelty AUROC, unseen classes (%)"))


def _points(classes_learned: Sequence[int], values: Sequence[float | None] | None) -> list[tuple[int, float]]:
    """(x, percent) pairs of the measured values: None/nan (not run, nothing unseen) are skipped."""
    return [(x, 100 * y) for x, y in zip(classes_learned, values or []) if y is not None and not math.isnan(y)]


def plot_accuracy_per_step(methods: Mapping[str, Mapping[str, Any]], classes_learned: list[int],
                           path: str | Path, *, title: str | None = None) -> Path:
    """One panel per metric of `PANELS`, x = number of classes learned after each step.
    Missing values (None/nan: a method not run at that step, AUROC with nothing unseen) are skipped."""
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    axes = fig.subplots(1, len(PANELS))
    for i, (name, result) in enumerate(methods.items()):
        style = {"label": name, "color": f"C{i % 10}", "linestyle": "-" if i < 10 else "--"}
        for ax, (key, _) in zip(axes, PANELS):
            points = _points(classes_learned, result.get(key))
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


NOVELTY_ROWS = (("auroc_per_step", "novelty AUROC (%)"), ("fpr95_per_step", "FPR at 95% TPR (%)"))


def plot_novelty_per_step(methods: Mapping[str, Mapping[str, Any]], classes_learned: list[int], path: str | Path, *,
                          title: str | None = None, reference: tuple[str, str] = ("linear-head", "msp")) -> Path:
    """A grid: one column per method with measured novelty scores (a method's `novelty` entry), novelty AUROC
    (top row, higher is better) and FPR at 95% TPR (bottom row, lower is better) after each step, one line per
    score; a score keeps its colour in every column. The `reference` (method, score), by default the base head's
    max-softmax, is drawn grey and dashed in the other columns, the baseline each score has to beat."""
    columns = [(name, result["novelty"]) for name, result in methods.items()
               if any(_points(classes_learned, s[key]) for s in (result.get("novelty") or {}).values()
                      for key, _ in NOVELTY_ROWS)]
    fig = Figure(figsize=(max(3.4 * len(columns), 5), 6.5), layout="constrained")
    if not columns:
        fig.text(0.5, 0.5, "no novelty score measured (nothing left unseen after any step)", ha="center")
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    axes = fig.subplots(len(NOVELTY_ROWS), len(columns), squeeze=False, sharey="row")
    colours = {score: f"C{i % 10}" for i, score in enumerate(dict.fromkeys(s for _, n in columns for s in n))}
    ref_method, ref_score = reference
    ref = (methods.get(ref_method, {}).get("novelty") or {}).get(ref_score)
    for col, (name, scores) in enumerate(columns):
        for row, (key, label) in enumerate(NOVELTY_ROWS):
            ax = axes[row][col]
            if ref is not None and name != ref_method and _points(classes_learned, ref[key]):
                xs, ys = zip(*_points(classes_learned, ref[key]))
                ax.plot(xs, ys, color="0.6", linestyle="--", label=f"{ref_method} {ref_score}")
            for score, result in scores.items():
                points = _points(classes_learned, result[key])
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, marker="o", markersize=4, color=colours[score], label=score)
            ax.set_xticks(classes_learned)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(name)
                ax.legend(fontsize=7)
            if row == len(NOVELTY_ROWS) - 1:
                ax.set_xlabel("classes learned")
            if col == 0:
                ax.set_ylabel(label)
    if title:
        fig.suptitle(title)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
