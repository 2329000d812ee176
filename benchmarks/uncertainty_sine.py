"""The sine demonstration for every method and several seeds: predictive std in the data, the gap and beyond.

    python benchmarks/uncertainty_sine.py --seeds 0 1 2 --out runs/sine

Runs `cifarlab.uncertainty.sine.run_sine` per method and seed (plus SGLD with one chain, to show what the
pooled chains add), writes each run folder under --out when given, and prints one row per run.
"""
from __future__ import annotations

import argparse
import dataclasses

from cifarlab.report.run_report import format_table
from cifarlab.uncertainty.sine import SINE_METHODS, SineConfig, run_sine

COLUMNS = ("method", "seed", "std_in_data", "std_in_gap", "std_beyond_data", "gap_to_data_ratio", "rmse_in_data",
           "samples", "train_seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", help="write each run folder under this folder")
    args = parser.parse_args()
    variants = [(m, SineConfig(method=m)) for m in SINE_METHODS] + [("sgld-1chain", SineConfig(chains=1))]
    rows = []
    for name, config in variants:
        for seed in args.seeds:
            out = f"{args.out}/{name}-seed{seed}" if args.out else None
            summary = run_sine(dataclasses.replace(config, seed=seed), out=out)
            rows.append({**summary, "method": name, "seed": seed})
    print(format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
