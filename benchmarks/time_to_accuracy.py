"""Time-to-accuracy of the fast recipes against their time targets, appended to a CSV (see cifarlab.train.bench).

    python benchmarks/time_to_accuracy.py --data ../shared/datasets/cifar10-jpeg --recipes fast-cpu,fast-cpu90
    python benchmarks/time_to_accuracy.py --data ... --recipes fast-gpu94,fast-gpu95,fast-gpu96  # the GPU presets
    python benchmarks/time_to_accuracy.py --data ... --recipes resnet18-adam --seeds 1            # any recipe

Targets: on 2 CPU cores >= 85% test accuracy in <= 10 min and >= 90% in <= 30 min; on one H100 >= 94% in <= 3 s
(airbench's protocol excludes compilation; here torch.compile time counts, inside the first epoch). 95% and 96%
have no time target. A row "meets" its target when every seed reached the threshold within the limit.

Prints, per recipe, one row per threshold (seeds that reached it, mean/min/max seconds, mean epoch, final
accuracy, images/s, peak memory, device), then one verdict per recipe and threshold (limit, worst seed, meets)
and the CSV path. Measured figures:
docs/training.md.
"""
from __future__ import annotations

import argparse

from cifarlab.config import RunConfig, load_recipe, merge
from cifarlab.report.run_report import format_table
from cifarlab.train.bench import append_csv, format_rows, time_to_accuracy

# recipe -> ((accuracy threshold, seconds allowed or None), ...)
TARGETS: dict[str, tuple[tuple[float, float | None], ...]] = {
    "fast-cpu": ((0.85, 600.0), (0.90, 1800.0)),
    "fast-cpu90": ((0.85, 600.0), (0.90, 1800.0)),
    "fast-gpu94": ((0.94, 3.0),),
    "fast-gpu95": ((0.95, None),),
    "fast-gpu96": ((0.96, None),),
}
OTHER_THRESHOLDS = ((0.85, None), (0.90, None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="dataset folder (default: $CIFARLAB_DATA, else the download cache)")
    parser.add_argument("--recipes", default="fast-cpu", help="comma-separated recipe names")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--csv", default="benchmarks/time_to_accuracy.csv", help="CSV the rows are appended to")
    args = parser.parse_args()

    verdicts = []
    for recipe in args.recipes.split(","):
        targets = TARGETS.get(recipe, OTHER_THRESHOLDS)
        overrides = {"data": {"path": args.data},
                     "train": {"device": args.device, "progress": False, "eval_every": 1}}  # thresholds: every epoch
        config = RunConfig.from_dict(merge(load_recipe(recipe), overrides), source=recipe)
        rows = time_to_accuracy(config, thresholds=[t for t, _ in targets], seeds=list(range(args.seeds)))
        print(format_rows(rows), flush=True)
        append_csv(args.csv, rows)
        for row, (_, limit) in zip(rows, targets):
            met = row["reached"] == args.seeds and (limit is None or row["seconds_max"] <= limit)
            verdicts.append({"recipe": recipe, "threshold": row["threshold"], "limit_s": limit,
                             "worst_s": row["seconds_max"], "meets": "yes" if met else "no"})
    print()
    print(format_table(verdicts, ["recipe", "threshold", "limit_s", "worst_s", "meets"]))
    print(f"rows appended to {args.csv}")


if __name__ == "__main__":
    main()
