"""Test accuracy against epsilon: one line per model, from DP run folders and/or a CSV of measured results.

    python benchmarks/dp_tradeoff_plot.py runs/dp-a runs/dp-b --out tradeoff.png
    python benchmarks/dp_tradeoff_plot.py --csv docs/img/dp_results.csv --out docs/img/dp_accuracy_vs_epsilon.png

A run folder contributes its summary.json (model, epsilon, test_accuracy); a CSV needs the columns model,
epsilon, test_accuracy (docs/img/dp_results.csv holds the recipes' measured results with their commands).
Prints the points it plotted and writes the PNG.
"""
from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cifarlab.io import atomic_write  # noqa: E402


def points_from_runs(run_dirs: list[str]) -> list[tuple[str, float, float]]:
    points = []
    for run_dir in map(Path, run_dirs):
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        if summary.get("epsilon") is None:
            raise SystemExit(f"{run_dir} is not a DP run: its summary.json has no epsilon")
        points.append((summary["model"], summary["epsilon"], summary["test_accuracy"]))
    return points


def points_from_csv(path: str) -> list[tuple[str, float, float]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [(row["model"], float(row["epsilon"]), float(row["test_accuracy"])) for row in csv.DictReader(f)]


def plot(points: list[tuple[str, float, float]], out: Path, *, title: str) -> Path:
    by_model: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for model, epsilon, accuracy in points:
        by_model[model].append((epsilon, accuracy))
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for model, xy in sorted(by_model.items(), key=lambda kv: -max(a for _, a in kv[1])):
        xy.sort()
        ax.plot([e for e, _ in xy], [100 * a for _, a in xy], marker="o", label=model)
    ax.set_xlabel("epsilon (delta = 1e-5)")
    ax.set_ylabel("test accuracy %")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written = atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="DP run folders (with summary.json)")
    parser.add_argument("--csv", help="measured results: columns model, epsilon, test_accuracy")
    parser.add_argument("--out", default="dp_tradeoff.png")
    parser.add_argument("--title", default="DP-SGD on CIFAR-10 (JPEG copy), 2-core CPU")
    args = parser.parse_args()
    points = points_from_runs(args.runs) + (points_from_csv(args.csv) if args.csv else [])
    if not points:
        parser.error("give DP run folders and/or --csv")
    for model, epsilon, accuracy in points:
        print(f"{model:40s} epsilon {epsilon:5.2f}  test accuracy {accuracy:.2%}")
    print(f"wrote {plot(points, Path(args.out), title=args.title)}")


if __name__ == "__main__":
    main()
