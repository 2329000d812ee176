"""The uncertainty comparison table: every method on the same data, model, epochs and seed.

Trains each method with `cifarlab.uncertainty.train.train_uncertainty` into <out>/<method>/ and prints the
table of the issue (accuracy, NLL, ECE, ECE after temperature scaling, OOD AUROC, train and predict seconds).
Flags after `--` are ordinary training flags (the same as `cifarlab train`), e.g. a CPU-sized run:

    python benchmarks/uncertainty_compare.py --out runs/uq-cpu --methods none mc-dropout ensemble sgld sgld-dp -- \
        --recipe cnn --data ../shared/datasets/cifar10-jpeg --classes 0-7 --train-subset 5000 \
        --test-subset 1000 --val-size 500 --epochs 10 --lr 0.05 --schedule constant --device cpu

A finished method's folder is reused (its summary.json read back), so an interrupted comparison resumes.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from cifarlab.cli import add_training_flags, config_from_args
from cifarlab.report.run_report import format_table
from cifarlab.uncertainty.train import (COMPARISON_COLUMNS, METHODS, UncertaintyConfig, comparison_rows,
                                        train_uncertainty)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder that receives one run folder per method")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--members", type=int, default=4, help="ensemble size")
    parser.add_argument("--passes", type=int, default=30, help="MC dropout passes")
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
            options = UncertaintyConfig(method=method, members=args.members, passes=args.passes,
                                        noise_multiplier=args.noise_multiplier,
                                        corruption_images=args.corruption_images)
            train_uncertainty(config, options, run_dir=run_dir)
        runs.append(run_dir)
    print(format_table(comparison_rows(runs), COMPARISON_COLUMNS))


if __name__ == "__main__":
    main()
