"""The uncertainty comparison table: every method on the same data, model, epochs and seed.

Trains each method with `cifarlab.uncertainty.train.train_uncertainty` into <out>/<method>/ and prints the
table of the issue (accuracy, NLL, Brier, ECE, OOD AUROC on held-out classes, accuracy / ECE / AUROC under
corruption, train and predict seconds), one row per method and one per method after temperature scaling
(fitted on the validation split, never the test set); the same table goes to <out>/comparison.md.
Flags after `--` are ordinary training flags (the same as `cifarlab train`).

RESULTS_PLACEHOLDER

A finished method's folder is reused (its summary.json read back), so an interrupted comparison resumes.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from cifarlab.cli import add_training_flags, config_from_args
from cifarlab.io import write_text
from cifarlab.report.run_report import format_table
from cifarlab.uncertainty.train import (COMPARISON_COLUMNS, METHODS, UncertaintyConfig, comparison_rows,
                                        train_uncertainty)

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
            options = UncertaintyConfig(method=method, members=args.members, passes=args.passes,
                                        temperature=args.temperature, sgld_lr=args.sgld_lr, burn_in=args.burn_in,
                                        noise_multiplier=args.noise_multiplier,
                                        corruption_images=args.corruption_images)
            train_uncertainty(config, options, run_dir=run_dir)
        runs.append(run_dir)
    rows = comparison_rows(runs)
    columns = [c for c in COMPARISON_COLUMNS if c not in ("run", "model", "epochs")]  # the same for every row
    write_text(Path(args.out) / "comparison.md", markdown_table(rows, columns) + "\n")
    print(format_table(rows, columns))
    print(f"\nmarkdown: {Path(args.out) / 'comparison.md'}")


if __name__ == "__main__":
    main()
