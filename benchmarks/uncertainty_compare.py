"""The uncertainty comparison table: every method on the same data, model, epochs and seed.

Trains each method with `cifarlab.uncertainty.train.train_uncertainty` into <out>/<method>/ and prints one
table (accuracy, NLL, Brier, ECE, OOD AUROC on held-out classes, accuracy / ECE / AUROC under
corruption, train and predict seconds), one row per method and one per method after temperature scaling
(fitted on the validation split, never the test set); the same table goes to <out>/comparison.md.
Flags after `--` are ordinary training flags (the same as `cifarlab train`).

Two comparisons, each command run alone on the machine (results and their discussion: docs/uncertainty.md).

The `fast` net of fast-cpu with dropout 0.2 on its pooled features, no label smoothing; classes 0-5
(airplane..dog) in-distribution, all 30,000 of their training images (2,000 of them the validation split), the
6,000 test images; OOD: the 4,000 test images of classes 6-9, corruptions on 1,000 test images; 15 epochs
one-cycle, batch 256, seed 0 (members 0-3); SGLD step 2 (the one-cycle peak), T = 0.001, samples from epochs
8-15. About 61 min wall on 2 CPU cores:

    python benchmarks/uncertainty_compare.py --out runs/uncertainty-fast \
        --methods none mc-dropout ensemble sgld --members 4 --passes 10 --sgld-lr 2.0 --temperature 0.001 \
        --corruption-images 1000 -- --recipe fast-cpu --data ../shared/datasets/cifar10-jpeg --classes 0-5 \
        --val-size 2000 --model-arg dropout=0.2 --label-smoothing 0 --epochs 15 --seed 0 --no-progress

The small `cnn` (3 conv5x5 + fc 1000 + dropout 0.5; no batch norm, so sgld-dp trains the very same network):
classes 0-5, a stratified 6,000 of their training images (1,000 of them the validation split), all 6,000 of
their test images; corruptions on 400 test images; 10 epochs. About 24 min wall on 2 CPU cores:

    python benchmarks/uncertainty_compare.py --out runs/uncertainty-cnn \
        --methods none mc-dropout ensemble --members 4 --passes 10 --corruption-images 400 -- \
        --data ../shared/datasets/cifar10-jpeg --classes 0-5 --train-subset 6000 --val-size 1000 \
        --model cnn --lr 0.05 --momentum 0.9 --weight-decay 5e-4 --schedule cosine --warmup-epochs 1 \
        --epochs 10 --batch-size 128 --seed 0 --device cpu --no-progress
    python benchmarks/uncertainty_compare.py --out runs/uncertainty-cnn \
        --methods sgld sgld-dp --sgld-lr 0.2 --temperature 0.001 --noise-multiplier 1.0 --corruption-images 400 -- ...

A finished method's folder is reused (its summary.json read back), so an interrupted comparison resumes.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from cifarlab.cli import add_training_flags, config_from_args
from cifarlab.io import write_text
from cifarlab.report.run_report import format_table
from cifarlab.config import UNCERTAINTY_METHODS as METHODS
from cifarlab.config import RunConfig
from cifarlab.uncertainty.train import COMPARISON_COLUMNS, comparison_rows, train_uncertainty

# decimals per column of the markdown table (the plain table picks its own)
DECIMALS = {"acc %": 1, "NLL": 3, "Brier": 3, "ECE %": 2, "ECE floor %": 2, "OOD AUROC": 3, "corr acc %": 1,
            "corr ECE %": 2, "corr AUROC": 3, "train s": 0, "predict s": 1}


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(column: str, value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.{DECIMALS[column]}f}" if isinstance(value, float) and column in DECIMALS else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(c, row.get(c)) for c in columns) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder that receives one run folder per method")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--members", type=int, default=4, help="ensemble size")
    parser.add_argument("--passes", type=int, default=30, help="MC dropout passes")
    parser.add_argument("--temperature", type=float, default=1.0, help="sgld, sgld-dp: posterior temperature")
    parser.add_argument("--sgld-lr", type=float, help="sgld, sgld-dp: step size (default --lr)")
    parser.add_argument("--burn-in", type=int, help="sgld, sgld-dp: epochs before the first sample (default half)")
    parser.add_argument("--noise-multiplier", type=float, default=1.0, help="sgld-dp sigma")
    parser.add_argument("--corruption-images", type=int, default=1000)
    args, training_flags = parser.parse_known_args()
    flags = argparse.ArgumentParser()
    add_training_flags(flags)
    config = config_from_args(flags.parse_args([f for f in training_flags if f != "--"]))

    runs = []
    for method in args.methods:
        run_dir = Path(args.out) / method
        if not (run_dir / "summary.json").exists():
            options = dict(method=method, members=args.members, passes=args.passes, temperature=args.temperature,
                           sgld_lr=args.sgld_lr, burn_in=args.burn_in, noise_multiplier=args.noise_multiplier,
                           corruption_images=args.corruption_images)
            train_uncertainty(RunConfig.from_dict({**config.to_dict(), "uncertainty": options}), run_dir=run_dir)
        runs.append(run_dir)
    rows = comparison_rows(runs)
    columns = [c for c in COMPARISON_COLUMNS if c not in ("run", "model", "epochs")]  # the same for every row
    write_text(Path(args.out) / "comparison.md", markdown_table(rows, columns) + "\n")
    print(format_table(rows, columns))
    print(f"\nmarkdown: {Path(args.out) / 'comparison.md'}")


if __name__ == "__main__":
    main()
