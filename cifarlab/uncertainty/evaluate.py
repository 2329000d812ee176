"""Evaluate a predictive distribution on CIFAR: calibration, OOD detection, accuracy under corruption, plots.

`evaluate_uncertainty` takes any method as a `Predict` function (normalised images -> class probabilities),
so the plain network, temperature scaling, MC dropout, ensembles and SGLD are measured by the same code.
Figures are bare matplotlib Figures saved through atomic_write (see cifarlab.report.plots for why).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from cifarlab.data.preprocess import to_float
from cifarlab.data.sources import Split, stratified_indices
from cifarlab.io import atomic_write, write_json
from cifarlab.uncertainty.baselines import fit_temperature, temperature_scale
from cifarlab.metrics import auroc
from cifarlab.uncertainty.metrics import (ReliabilityBins, bins_ece, calibrated_ece, classification_metrics,
                                          predictive_entropy, reliability_bins)
from cifarlab.uncertainty.ood import CORRUPTIONS, SEVERITIES, corrupt

Predict = Callable[[Tensor], Tensor]  # normalised images (N, 3, H, W) -> probabilities (N, K)


def evaluate_uncertainty(
    predict: Predict,
    *,
    test: Split,
    preprocess: Callable[[Tensor], Tensor],
    val: Split | None = None,
    ood_images: Tensor | None = None,
    corruptions: Sequence[str] = tuple(CORRUPTIONS),
    severities: Sequence[int] = SEVERITIES,
    corruption_images: int | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    title: str = "",
) -> dict[str, Any]:
    """Metrics of `predict` on the test split, and with `out_dir`, uncertainty.json and the plots there.

    val: held-out training images to fit a temperature on (adds the `*_ts` entries; never the test set).
    ood_images: uint8 images of classes the model never saw (adds `ood_auroc`: predictive entropy separating
    them from the test set). Corruptions are applied to a class-balanced subset of `corruption_images` test
    images (all when None): each corruption and severity costs one prediction pass over them;
    `corruption_mean` averages their metrics over corruptions and severities >= 1. `ece_floor` is the ECE a
    perfectly calibrated predictor with the same confidences would show on as many images (metrics.calibrated_ece).
    """

    def probs_of(images: Tensor) -> Tensor:
        return predict(preprocess(to_float(images))).float().cpu()

    start = time.perf_counter()
    probs = probs_of(test.images)
    predict_seconds = time.perf_counter() - start
    labels = test.labels.cpu()
    results: dict[str, Any] = {"test": _test_metrics(probs, labels, seed), "test_images": len(labels),
                               "predict_seconds": predict_seconds}
    temperature = None
    if val is not None:
        temperature = fit_temperature(probs_of(val.images), val.labels.cpu())
        scaled = temperature_scale(probs, temperature)
        results.update(temperature=temperature, test_ts=_test_metrics(scaled, labels, seed))
    if ood_images is not None:
        ood_probs = probs_of(ood_images)
        results["ood_images"] = len(ood_images)
        results["ood_entropy"] = predictive_entropy(ood_probs).mean().item()
        results["ood_auroc"] = auroc(predictive_entropy(ood_probs), predictive_entropy(probs))
        if temperature is not None:
            ood_scaled = temperature_scale(ood_probs, temperature)
            results["ood_auroc_ts"] = auroc(predictive_entropy(ood_scaled), predictive_entropy(scaled))

    # a class-balanced subset: test splits are often ordered by class
    subset = torch.arange(len(labels)) if corruption_images is None or corruption_images >= len(labels) else \
        stratified_indices(labels, corruption_images, seed=seed)
    subset_labels = labels[subset]

    def shift_metrics(shifted_probs: Tensor) -> dict[str, float]:
        """Accuracy, NLL, ECE and AUROC against the clean images (+ the same after temperature scaling)."""
        entry = _shift_metrics(shifted_probs, probs[subset], subset_labels)
        if temperature is not None:
            scaled_entry = _shift_metrics(temperature_scale(shifted_probs, temperature),
                                          temperature_scale(probs[subset], temperature), subset_labels)
            entry.update({f"{k}_ts": v for k, v in scaled_entry.items() if k != "accuracy"})  # TS keeps the argmax
        return entry

    clean = shift_metrics(probs[subset])
    shifted: dict[str, dict[str, dict[str, float]]] = {}
    for name in corruptions:
        generator = torch.Generator(device=test.images.device).manual_seed(seed)
        shifted[name] = {"0": clean}
        for severity in severities:
            images = corrupt(test.images[subset.to(test.images.device)], name, severity, generator=generator)
            shifted[name][str(severity)] = shift_metrics(probs_of(images))
    results["corruptions"] = shifted
    results["corruption_images"] = len(subset)
    levels = [by_level[str(s)] for by_level in shifted.values() for s in severities]
    if levels:
        results["corruption_mean"] = {k: sum(level[k] for level in levels) / len(levels) for k in clean}

    if out_dir is not None:
        out_dir = Path(out_dir)
        write_json(out_dir / "uncertainty.json", results)
        plot_reliability(reliability_bins(probs, labels), out_dir / "reliability.png", title=title)
        if shifted:
            plot_corruptions(shifted, out_dir / "corruption.png", title=title)
    return results


def _test_metrics(probs: Tensor, labels: Tensor, seed: int) -> dict[str, float]:
    floor = calibrated_ece(probs, generator=torch.Generator().manual_seed(seed))
    return {**classification_metrics(probs, labels), "ece_floor": floor}


def _shift_metrics(shifted: Tensor, clean: Tensor, labels: Tensor) -> dict[str, float]:
    metrics = classification_metrics(shifted, labels)
    return {
        **{k: metrics[k] for k in ("accuracy", "nll", "ece")},
        # can entropy tell the corrupted copy from the clean image? (0.5: not at all)
        "auroc_vs_clean": auroc(predictive_entropy(shifted), predictive_entropy(clean)),
    }


def plot_reliability(bins: ReliabilityBins, path: str | Path, *, title: str = "") -> Path:
    """Left: accuracy per confidence bin against the diagonal (Guo et al. 2017). Right: confidence histogram."""
    edges = bins.edges.numpy()
    width = edges[1] - edges[0]
    centers = edges[:-1] + width / 2
    full = (bins.count > 0).numpy()
    accuracy, confidence = bins.accuracy.numpy(), bins.confidence.numpy()
    total = bins.count.sum().item()
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    diagram, histogram = fig.subplots(1, 2)
    diagram.bar(centers[full], accuracy[full], width=width, color="C0", edgecolor="k", lw=0.5, label="accuracy")
    diagram.bar(centers[full], confidence[full] - accuracy[full], bottom=accuracy[full], width=width,
                color="C3", alpha=0.35, edgecolor="C3", lw=0.5, label="gap to confidence")
    diagram.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    diagram.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max probability)", ylabel="accuracy",
                title=f"Reliability diagram (ECE {100 * bins_ece(bins):.2f}%)")
    diagram.legend(fontsize=8, loc="upper left")
    histogram.bar(centers, 100 * bins.count.numpy() / total, width=width, color="C0", edgecolor="k", lw=0.5)
    mean_confidence = float((bins.count[full].double() * bins.confidence[full]).sum() / total)
    mean_accuracy = float((bins.count[full].double() * bins.accuracy[full]).sum() / total)
    histogram.axvline(mean_accuracy, color="C2", lw=2, label=f"accuracy {100 * mean_accuracy:.1f}%")
    histogram.axvline(mean_confidence, color="C3", lw=2, ls="--", label=f"mean confidence {100 * mean_confidence:.1f}%")
    histogram.set(xlim=(0, 1), xlabel="confidence (max probability)", ylabel="% of test images",
                  title="Confidence histogram")
    histogram.legend(fontsize=8, loc="upper left")
    for ax in (diagram, histogram):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def plot_corruptions(shifted: dict[str, dict[str, dict[str, float]]], path: str | Path, *, title: str = "") -> Path:
    """Accuracy and ECE against corruption severity (0 = clean), one line per corruption and their mean."""
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    levels = sorted(next(iter(shifted.values())), key=int)
    for ax, metric, label in zip(axes, ("accuracy", "ece"), ("accuracy (%)", "ECE (%)")):
        for i, (name, by_level) in enumerate(shifted.items()):
            ax.plot([int(s) for s in levels], [100 * by_level[s][metric] for s in levels], marker="o", ms=3,
                    color=f"C{i}", lw=1, alpha=0.8, label=name)
        mean = [100 * sum(by_level[s][metric] for by_level in shifted.values()) / len(shifted) for s in levels]
        ax.plot([int(s) for s in levels], mean, "k-", lw=2.5, marker="o", label="mean")
        ax.set(xlabel="severity (0 = clean)", ylabel=label, xticks=[int(s) for s in levels])
        ax.grid(alpha=0.3)
    axes[0].set_title("Accuracy under corruption")
    axes[1].set_title("Calibration under corruption")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
