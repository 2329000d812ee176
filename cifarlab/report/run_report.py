"""Read run folders (config.yaml, metrics.csv, summary.json) and turn them into report.md, figures and tables."""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from cifarlab.errors import CifarlabError
from cifarlab.io import read_yaml, write_text
from cifarlab.report.plots import plot_compare, plot_confusion, plot_curves

CONFIG_FILE, METRICS_FILE, SUMMARY_FILE = "config.yaml", "metrics.csv", "summary.json"
SUMMARY_KEYS = ("model", "test_accuracy", "best_epoch", "val_accuracy", "per_class_accuracy", "epochs",
                "train_seconds", "images_per_second", "device", "num_parameters", "classes", "confusion_matrix")
STANDARD_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
                    "epoch_seconds", "images_per_second")
# Settings (dotted keys of the resolved RunConfig; a key also covers its sub-keys) worth a glance in report.md;
# the full config is linked next to them. A section whose `enabled` is false is left out.
HIGHLIGHT_KEYS = ("recipe", "data.dataset", "data.val_size", "data.train_subset", "data.crop_padding",
                  "data.flip", "data.cutout", "model.name", "model.args", "optim.optimizer", "optim.lr",
                  "optim.momentum", "optim.weight_decay", "optim.schedule", "optim.warmup_epochs",
                  "optim.label_smoothing", "train.epochs", "train.batch_size", "train.seed", "train.precision",
                  "dp.target_epsilon", "dp.noise_multiplier", "dp.delta", "dp.max_grad_norm", "dp.augmult")


def read_metrics(run_dir: str | Path) -> list[dict[str, float | int | None]]:
    """Rows of metrics.csv: epoch as int, every other column float, None where the cell is empty."""
    path = _run_file(run_dir, METRICS_FILE)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "epoch" not in reader.fieldnames:
            raise CifarlabError(f"{path} has no 'epoch' column in its header; is it a cifarlab metrics file?")
        rows = []
        for line, row in enumerate(reader, start=2):
            values = {key: _number(path, line, key, text) for key, text in row.items()}
            if values["epoch"] is None:
                raise CifarlabError(f"{path} line {line}: the epoch cell is empty")
            rows.append(values | {"epoch": int(values["epoch"])})
    return rows


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """summary.json of a run, checked to hold every key the reports use."""
    path = _run_file(run_dir, SUMMARY_FILE)
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CifarlabError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(summary, dict):
        raise CifarlabError(f"{path} must hold a JSON object, found {type(summary).__name__}")
    missing = [key for key in SUMMARY_KEYS if key not in summary]
    if missing:
        raise CifarlabError(f"{path} lacks the keys {', '.join(missing)}")
    return summary


def write_run_report(run_dir: str | Path) -> Path:
    """(Re)create curves.png, confusion.png and report.md in a run folder; returns the report's path."""
    run_dir = Path(run_dir)
    rows, summary = read_metrics(run_dir), read_summary(run_dir)
    config_path = _run_file(run_dir, CONFIG_FILE)
    try:
        config = read_yaml(config_path) or {}
    except yaml.YAMLError as e:
        raise CifarlabError(f"{config_path} is not valid YAML: {e}") from None
    if not isinstance(config, Mapping):
        raise CifarlabError(f"{config_path} must hold a mapping of settings, found {type(config).__name__}")
    plot_curves(rows, run_dir / "curves.png", title=f"{summary['model']} ({run_dir.name})")
    plot_confusion(torch.tensor(summary["confusion_matrix"]), summary["classes"], run_dir / "confusion.png")
    return write_text(run_dir / "report.md", _report_markdown(run_dir.name, summary, config, rows))


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Aligned plain-text table; numbers right-aligned with one number of decimals per column, '-' if missing."""
    numeric = [all(_is_number(row.get(c)) or row.get(c) is None for row in rows) for c in columns]
    # enough decimals to show every float of the column to 4 significant digits, so decimal points line up
    decimals = [max([_decimals(row[c]) for row in rows if isinstance(row.get(c), float)], default=0)
                for c in columns]
    cells = [[_cell(row.get(c), d) for c, d in zip(columns, decimals)] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def compare_runs(run_dirs: Sequence[str | Path], *, out: str | Path | None = None) -> str:
    """One table row per run folder, plus compare.png (overlaid test curves) in folder `out` (default: cwd)."""
    if not run_dirs:
        raise CifarlabError("compare needs at least one run folder")
    paths = [Path(d) for d in run_dirs]
    # folder names are short labels; fall back to the paths as given when two runs share a name
    names = [p.name for p in paths] if len({p.name for p in paths}) == len(paths) else [str(p) for p in paths]
    table, curves = [], {}
    for name, path in zip(names, paths):
        summary = read_summary(path)
        curves[name] = read_metrics(path)
        val = summary["val_accuracy"]
        table.append({
            "run": name,
            "model": summary["model"],
            "epochs": summary["epochs"],
            "test acc %": 100 * summary["test_accuracy"],
            "best epoch": summary["best_epoch"],
            "val acc %": None if val is None else 100 * val,
            "train min": summary["train_seconds"] / 60,
            "images/s": summary["images_per_second"],
            "params M": summary["num_parameters"] / 1e6,
        })
    plot_compare(curves, Path(out if out is not None else ".") / "compare.png", metric="test_acc")
    return format_table(table, list(table[0]))


def _run_file(run_dir: str | Path, name: str) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CifarlabError(f"run folder {run_dir} does not exist")
    path = run_dir / name
    if not path.is_file():
        raise CifarlabError(f"run folder {run_dir} has no {name}; is it a finished cifarlab run?")
    return path


def _number(path: Path, line: int, column: str | None, text: str | list[str] | None) -> float | None:
    # csv.DictReader files surplus cells under the key None and missing ones as None
    if column is None:
        raise CifarlabError(f"{path} line {line} has more cells than the header")
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        raise CifarlabError(f"{path} line {line}, column {column!r}: {text!r} is not a number") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _decimals(value: float, significant: int = 4, most: int = 6) -> int:
    """Decimals that show `value` to `significant` digits (at most `most`), trailing zeros dropped."""
    if value == 0 or not math.isfinite(value):
        return 0
    digits = min(most, max(0, significant - 1 - math.floor(math.log10(abs(value)))))
    return len(f"{value:.{digits}f}".rstrip("0").partition(".")[2])


def _cell(value: Any, decimals: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:,.{decimals}f}"
    if _is_number(value):
        return f"{value:,}"
    return str(value)


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"optim.lr": 0.1, ...}."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])


def _report_markdown(name: str, summary: Mapping[str, Any], config: Mapping[str, Any],
                     rows: Sequence[Mapping[str, Any]]) -> str:
    flat = _flatten(config)
    disabled = {key.rsplit(".", 1)[0] for key, value in flat.items() if key.endswith(".enabled") and value is False}
    highlights = [(key, value) for key, value in flat.items()
                  if value is not None and key.split(".", 1)[0] not in disabled
                  and any(key == h or key.startswith(f"{h}.") for h in HIGHLIGHT_KEYS)]
    results = [
        ("test accuracy", _percent(summary["test_accuracy"])),
        ("val accuracy", _percent(summary["val_accuracy"])),
        ("best epoch", f"{summary['best_epoch']} of {summary['epochs']}"),
        ("train time", _duration(summary["train_seconds"])),
        ("images/s", f"{summary['images_per_second']:,.0f}"),
        ("device", summary["device"]),
        ("parameters", f"{summary['num_parameters']:,}"),
    ]
    # extra per-epoch columns (e.g. epsilon) are reported at their last measured value
    extra = [c for c in (rows[0] if rows else {}) if c not in STANDARD_COLUMNS]
    for column in extra:
        measured = [row[column] for row in rows if row[column] is not None]
        if measured:
            results.append((f"final {column}", f"{measured[-1]:.4g}"))
    counts = torch.tensor(summary["confusion_matrix"]).sum(dim=1).tolist()
    per_class = [(c, n, _percent(summary["per_class_accuracy"].get(c)))
                 for c, n in zip(summary["classes"], counts)]
    return "\n\n".join([
        f"# Run {name}",
        f"Model **{summary['model']}**, test accuracy **{_percent(summary['test_accuracy'])}** "
        f"after {summary['epochs']} epochs.",
        "## Config highlights",
        _markdown_table(["setting", "value"], highlights) if highlights else "(none of the usual settings found)",
        f"Full resolved config: [{CONFIG_FILE}]({CONFIG_FILE})",
        "## Results",
        _markdown_table(["metric", "value"], results),
        "## Per-class accuracy",
        _markdown_table(["class", "test images", "accuracy"], per_class),
        "## Curves",
        "![training curves](curves.png)",
        "## Confusion matrix",
        "![confusion matrix](confusion.png)",
    ]) + "\n"
