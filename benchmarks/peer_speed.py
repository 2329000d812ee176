"""Side by side with a peer: airbench94's CPU port and cifarlab recipes, one after the other on this machine.

    python benchmarks/peer_speed.py --recipes fast-cpu90 --threads 2          # the peer's full run, then fast-cpu90
    python benchmarks/peer_speed.py --recipes fast-cpu,fast-cpu90 --runs 3 --thresholds 0.85,0.90
    python benchmarks/peer_speed.py --recipes fast-cpu --peer-log bench-airbench94-<date>.log   # a saved peer run

The peer runs as a subprocess of its own script, never imported: `--peer airbench94` is
`../shared/peers/airbench94-cpu/airbench94_cpu.py`, looked for beside the checkout, then under the current
folder (`--peer-script PATH` names another copy). Its output is streamed, saved beside the CSV
(`<csv name>-airbench94-<date>.log`, which `--peer-log` reads back instead of running it again) and parsed.
Both sides get the same thread count (`--threads`, default: the cores this process may use) and the same JPEG
image folder (`--data`, default `../shared/datasets/cifar10-jpeg`); the peer computes in the precision
`precision: auto` picks for this CPU (fp32 without native bf16, else bf16; `--peer-dtype` overrides), as the
fast-cpu recipes do.

Prints the machine (CPU model and ISA; a recipe trained on a GPU names it in its device column) and threads, then
one row per side (the peer, each recipe): runs, epochs, precision, device, final test accuracy (mean over the runs)
with TTA as each side does it, training seconds, images/s and seconds to each threshold; then one row per recipe of
ours / peer ratios (seconds below 1 and images/s above 1: ours is faster) and the accuracy difference in points.
Rows go to the bench CSV (`--csv`, the columns of `cifarlab bench`), one per side and threshold, the peer's as
recipe `peer:airbench94`.

How both sides are counted:
- training seconds: the training loop alone, the sum of each side's per-epoch seconds (ours: the engine's, which
  leave evaluations out; the peer's add up to its printed train_seconds). Loading or decoding the data, building the
  model, the data-dependent init (both whiten the first layer from the data) and every evaluation are left out.
- images/s: training images seen / training seconds.
- seconds to a threshold: training seconds up to the end of the first epoch whose test accuracy reaches it, mean
  over the runs if every run reached it, else "- (k/n)" (the CSV's seconds_* are over the k runs that did). Ours:
  the recipe's TTA accuracy after each epoch (`--eval-every 1` unless told otherwise; with k > 1 only the evaluated
  epochs count, an upper bound). The peer prints each epoch's test accuracy without TTA (its `val_acc`, measured
  outside its timed loop) and evaluates with its TTA only after the last epoch, so its epochs count with their
  accuracy without TTA and its last with TTA. Its epochs are numbered from 1 here (it prints them from 0).

`--train-subset`, `--test-subset` and `--epochs` / `--peer-epochs` are for smoke runs: the two sides pick
different images (ours stratified; the peer the first N of its fixed shuffle of the training images and the
first N test images, all of one class in the class-sorted image folder), so such accuracies do not compare.
Measured figures: docs/training.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from cifarlab.config import RunConfig, load_recipe, merge
from cifarlab.errors import CifarlabError
from cifarlab.hardware import choose_precision, machine_name, thread_count
from cifarlab.report.run_report import format_table
from cifarlab.train.bench import append_csv, crossing, train_once

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path("..") / "shared"
PEERS = {"airbench94": SHARED / "peers" / "airbench94-cpu" / "airbench94_cpu.py"}  # beside the checkout or cwd
DEFAULT_DATA = SHARED / "datasets" / "cifar10-jpeg"
PEER_BATCH_SIZE = 1024  # airbench94's hyp['opt']['batch_size'], for the CSV
TIMED = "train"  # the CSV's `timed` column: seconds_* count the training loop alone
TAIL_LINES = 15  # of an output that could not be read, quoted in the error


class PeerError(CifarlabError):
    """The peer is missing, failed, or printed what this module cannot read."""


@dataclass(frozen=True)
class PeerRun:
    """One training run as airbench94 prints it."""

    epoch_seconds: list[float]  # each epoch's training loop
    epoch_acc: list[float]  # test accuracy after each epoch, without TTA (its val_acc)
    tta_acc: float  # after the last epoch, with its TTA (flip and two shifts at tta_level 2)
    train_seconds: float  # the training loop
    init_seconds: float  # the whitening init
    tta_seconds: float  # the final TTA evaluation
    train_images: int

    @property
    def accuracies(self) -> list[float]:
        """Per-epoch test accuracy as the thresholds count it: without TTA, the last epoch's with TTA."""
        return [*self.epoch_acc[:-1], self.tta_acc]


@dataclass(frozen=True)
class PeerOutput:
    runs: list[PeerRun]
    threads: int | None  # from its config line
    dtype: str | None
    epochs: float | None


_SUMMARY_FIELDS = {  # run summary line: field -> pattern of its value
    "train_images": r"\btrain_images=(\d+)",
    "tta_acc": r"\btta_val_acc\(tta_level=\d+\)=([0-9.]+)",
    "train_seconds": r"\btrain_seconds=([0-9.]+)",
    "init_seconds": r"\bwhiten_init_seconds=([0-9.]+)",
    "tta_seconds": r"\btta_eval_seconds=([0-9.]+)",
}
_EPOCH_COLUMNS = ("epoch", "val_acc", "tta_val_acc", "epoch_seconds")  # of its per-epoch table, by header name
_FORMAT = ("a header row '| run | epoch | train_loss | train_acc | val_acc | tta_val_acc | epoch_seconds | ... |', "
           "a row per epoch and one 'eval' row per run, and a 'run summary: ... train_images=N ... "
           "tta_val_acc(tta_level=2)=A ... train_seconds=S whiten_init_seconds=S tta_eval_seconds=S ...' line per run")


def parse_peer_output(text: str, *, name: str = "airbench94") -> PeerOutput:
    """airbench94_cpu.py's stdout -> its runs; PeerError quoting the output's tail if the format is not its own."""
    runs: list[PeerRun] = []
    header: dict[str, int] | None = None
    seconds: list[float] = []
    accuracies: list[float] = []
    threads = dtype = epochs = None
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line.startswith("torch ") and " | threads " in line:  # its config line
            threads = _search(r"\| threads (\d+)", line, int)
            dtype = _search(r"\| dtype (\w+)", line, str)
            epochs = _search(r"\| epochs ([0-9.]+)", line, float)
        elif line.startswith("|") and line.endswith("|"):
            cells = [cell.strip() for cell in line[1:-1].split("|")]
            if "epoch" in cells:
                header = {cell: i for i, cell in enumerate(cells)}
                missing = [column for column in _EPOCH_COLUMNS if column not in header]
                if missing:
                    raise _unreadable(text, name, f"its table header (line {number}) lacks {', '.join(missing)}")
                continue
            if header is None or len(cells) != len(header):
                raise _unreadable(text, name, f"line {number} is a table row without a matching header")
            epoch = cells[header["epoch"]]
            if epoch == "eval":
                continue  # the final TTA row: the run summary line has the same numbers
            try:
                if int(epoch) != len(seconds):
                    raise _unreadable(text, name, f"line {number} has epoch {epoch}, expected {len(seconds)}")
                seconds.append(float(cells[header["epoch_seconds"]]))
                accuracies.append(float(cells[header["val_acc"]]))
            except ValueError:
                raise _unreadable(text, name, f"line {number} is not a row of numbers") from None
        elif line.startswith("run summary:"):
            values = {key: _search(pattern, line, float) for key, pattern in _SUMMARY_FIELDS.items()}
            missing = [key for key, value in values.items() if value is None]
            if missing or not seconds:
                problem = f"lacks {', '.join(missing)}" if missing else "follows no per-epoch rows"
                raise _unreadable(text, name, f"the run summary on line {number} {problem}")
            runs.append(PeerRun(epoch_seconds=seconds, epoch_acc=accuracies, tta_acc=values["tta_acc"],
                                train_seconds=values["train_seconds"], init_seconds=values["init_seconds"],
                                tta_seconds=values["tta_seconds"], train_images=int(values["train_images"])))
            seconds, accuracies = [], []
    if seconds:
        raise _unreadable(text, name, f"its last run has {len(seconds)} epoch rows but no run summary")
    if not runs:
        raise _unreadable(text, name, "no run summary line was found")
    return PeerOutput(runs=runs, threads=threads, dtype=dtype, epochs=epochs)


def _search(pattern: str, line: str, kind: type) -> Any:
    found = re.search(pattern, line)
    return kind(found.group(1)) if found else None


def _unreadable(text: str, name: str, problem: str) -> PeerError:
    lines = [line for line in text.splitlines() if line.strip()][-TAIL_LINES:]
    tail = "\n".join(f"    {line}" for line in lines) or "    (nothing)"
    return PeerError(f"cannot read {name}'s output: {problem}. Expected {_FORMAT}. Its last lines:\n{tail}")


def find_beside_checkout(relative: Path) -> Path | None:
    """`relative` (e.g. ../shared/...) from the checkout's root, else from the current folder; None if in neither."""
    for base in (ROOT, Path.cwd()):
        if (base / relative).exists():
            return (base / relative).resolve()
    return None


def peer_script(peer: str, script: str | None) -> Path:
    """The peer's script: `script` if given, else its default path beside the checkout or the current folder."""
    if peer not in PEERS:
        raise PeerError(f"unknown peer {peer!r}; valid: {', '.join(PEERS)}")
    if script is not None:
        if not Path(script).is_file():
            raise PeerError(f"--peer-script {script} is not a file")
        return Path(script).resolve()
    found = find_beside_checkout(PEERS[peer])
    if found is None:
        places = " nor ".join(str((base / PEERS[peer]).resolve()) for base in (ROOT, Path.cwd()))
        raise PeerError(f"{peer}: no script at {places}; pass --peer-script PATH (its airbench94_cpu.py) or "
                        "--peer-log FILE (the saved output of one of its runs)")
    return found


def run_peer(script: Path, *, name: str, threads: int, data: Path, dtype: str, runs: int, epochs: float | None,
             train_subset: int | None, test_subset: int | None, log: Path) -> tuple[str, float]:
    """Run the peer's script in a scratch folder (it writes logs/<uuid>/ where it runs), streaming its output to
    ours and saving it to `log`: its output and peak resident memory (MB), or PeerError naming its exit status and
    tail."""
    command = [sys.executable, str(script), "--threads", str(threads), "--data-dir", str(data), "--dtype", dtype,
               "--runs", str(runs)]
    if data.resolve() != (script.parent / ".." / ".." / "datasets" / "cifar10-jpeg").resolve():
        # its decoded cache does not record which folder it came from: one cache file per data folder
        key = hashlib.sha1(str(data.resolve()).encode()).hexdigest()[:10]
        command += ["--cache", str(Path.home() / ".cache" / "airbench94-cpu" / f"{data.name}-{key}_uint8.pt")]
    for flag, value in (("--epochs", epochs), ("--train-subset", train_subset), ("--test-subset", test_subset)):
        if value is not None:
            command += [flag, str(value)]
    print("$ " + " ".join(command), flush=True)
    lines = []
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as scratch:
        with subprocess.Popen(command, cwd=scratch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              bufsize=1) as process:
            for line in process.stdout:
                print(f"{name} | {line}", end="", flush=True)
                lines.append(line)
    output = "".join(lines)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(output, encoding="utf-8")
    if process.returncode:
        tail = "\n".join(f"    {line}" for line in output.splitlines()[-TAIL_LINES:])
        raise PeerError(f"{name} exited with status {process.returncode} (output saved to {log}):\n{tail}")
    print(f"{name}'s output saved to {log}", flush=True)
    # the largest child's peak so far: the peer, as nothing else this process starts comes near its size
    return output, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def run_ours(recipe: str, *, data: Path, runs: int, eval_every: int, epochs: int | None, device: str | None,
             train_subset: int | None, test_subset: int | None) -> tuple[RunConfig, list[dict[str, Any]]]:
    """The recipe trained `runs` times (seeds 0..runs-1) as `cifarlab train` builds it, without a run folder."""
    overrides: dict[str, Any] = {"data": {"path": str(data)}, "train": {"eval_every": eval_every}}
    for section, key, value in (("data", "train_subset", train_subset), ("data", "test_subset", test_subset),
                                ("train", "epochs", epochs), ("train", "device", device)):
        if value is not None:
            overrides[section][key] = value
    config = RunConfig.from_dict(merge(load_recipe(recipe), overrides), source=recipe)
    results = []
    for seed in range(runs):
        seeded = RunConfig.from_dict(merge(config.to_dict(), {"train": {"seed": seed}}), source=recipe)
        results.append(train_once(seeded))
        run = results[-1]
        print(f"{recipe} seed {seed}: final test accuracy {run['test_acc'][-1]:.2%} after {len(run['test_acc'])} "
              f"epochs, {sum(run['epoch_seconds']):.0f} s of training", flush=True)
    return config, results


@dataclass(frozen=True)
class Side:
    """One side of the comparison, reduced to what both sides report alike."""

    name: str
    accuracies: list[list[float | None]]  # per run, per epoch; None: not evaluated
    epoch_seconds: list[list[float]]  # per run, per epoch: the training loop
    train_images: list[int]  # per run
    precision: str
    device: str
    fixed: dict[str, Any]  # the CSV columns that do not depend on the threshold

    @property
    def final(self) -> list[float]:
        return [run[-1] for run in self.accuracies]

    @property
    def train_seconds(self) -> float:
        return statistics.fmean(sum(run) for run in self.epoch_seconds)

    @property
    def images_per_second(self) -> float:
        return sum(self.train_images) / sum(sum(run) for run in self.epoch_seconds)

    def hits(self, threshold: float) -> list[tuple[int, float]]:
        """(epoch, training seconds) of each run that reached `threshold`."""
        found = [crossing(acc, epoch_seconds=secs, eval_seconds=[0.0] * len(secs), setup_seconds=0.0,
                          threshold=threshold) for acc, secs in zip(self.accuracies, self.epoch_seconds)]
        return [hit for hit in found if hit is not None]

    def seconds_to(self, threshold: float) -> float | None:
        """Mean training seconds to `threshold` over the runs, None unless every run reached it."""
        hits = self.hits(threshold)
        return statistics.fmean(s for _, s in hits) if len(hits) == len(self.accuracies) else None

    def csv_rows(self, thresholds: Sequence[float]) -> list[dict[str, Any]]:
        rows = []
        for threshold in thresholds:
            hits = self.hits(threshold)
            seconds = [s for _, s in hits]
            rows.append({
                **self.fixed,
                "threshold": threshold,
                "reached": len(hits),
                "seconds_mean": statistics.fmean(seconds) if hits else None,
                "seconds_min": min(seconds, default=None),
                "seconds_max": max(seconds, default=None),
                "epoch_mean": statistics.fmean(e for e, _ in hits) if hits else None,
                "final_acc_mean": statistics.fmean(self.final),
                "final_acc_min": min(self.final),
                "final_acc_max": max(self.final),
                "images_per_second": self.images_per_second,
                "device": self.device,
            })
        return rows


def peer_side(name: str, output: PeerOutput, *, common: dict[str, Any], data: Path,
              peak_memory_mb: float | None = None) -> Side:
    runs = output.runs
    return Side(name=f"peer:{name}", accuracies=[run.accuracies for run in runs],
                epoch_seconds=[run.epoch_seconds for run in runs], train_images=[run.train_images for run in runs],
                precision=output.dtype or "?", device="cpu", fixed={
                    **common, "recipe": f"peer:{name}", "model": name, "seeds": " ".join(map(str, range(len(runs)))),
                    "epochs": output.epochs, "batch_size": PEER_BATCH_SIZE, "data_source": str(data),
                    "peak_memory_mb": peak_memory_mb,
                    "threads": output.threads,
                })  # fmt: skip


def our_side(config: RunConfig, runs: list[dict[str, Any]], *, common: dict[str, Any]) -> Side:
    return Side(name=config.recipe or config.model.name, accuracies=[run["test_acc"] for run in runs],
                epoch_seconds=[run["epoch_seconds"] for run in runs],
                train_images=[run["train_images"] for run in runs],
                precision=runs[0]["precision"], device=runs[0]["device"], fixed={
                    **common, "recipe": config.recipe, "model": config.model.name,
                    "model_args": json.dumps(config.model.args, sort_keys=True),
                    "eval_from": 1, "eval_every": config.train.eval_every,
                    "seeds": " ".join(map(str, range(len(runs)))), "epochs": config.train.epochs,
                    "batch_size": config.train.batch_size, "data_source": runs[0]["data_source"],
                    "peak_memory_mb": max(run["peak_memory_mb"] for run in runs), "machine": runs[0]["machine"],
                    "threads": torch.get_num_threads(),
                })  # fmt: skip


def side_table(sides: Sequence[Side], thresholds: Sequence[float]) -> str:
    rows = []
    for side in sides:
        row = {"side": side.name, "runs": len(side.accuracies), "epochs": len(side.epoch_seconds[0]),
               "precision": side.precision, "device": side.device,
               "final acc %": 100 * statistics.fmean(side.final), "train s": side.train_seconds,
               "images/s": side.images_per_second}
        for threshold in thresholds:
            seconds, reached = side.seconds_to(threshold), len(side.hits(threshold))
            row[f"s to {threshold:.0%}"] = seconds if seconds is not None else f"- ({reached}/{len(side.accuracies)})"
        rows.append(row)
    return format_table(rows, list(rows[0]))


def ratio_table(peer: Side, ours: Sequence[Side], thresholds: Sequence[float]) -> str:
    rows = []
    for side in ours:
        row = {"ours / peer": f"{side.name} / {peer.name}", "train s": side.train_seconds / peer.train_seconds,
               "images/s": side.images_per_second / peer.images_per_second}
        for threshold in thresholds:
            a, b = side.seconds_to(threshold), peer.seconds_to(threshold)
            row[f"s to {threshold:.0%}"] = a / b if a is not None and b is not None else None
        row["acc diff (points)"] = 100 * (statistics.fmean(side.final) - statistics.fmean(peer.final))
        rows.append(row)
    return format_table(rows, list(rows[0]))


def _thresholds(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fractions like 0.85,0.90, got {text!r}") from None
    if any(not 0 <= value <= 1 for value in values):
        raise argparse.ArgumentTypeError(f"thresholds are fractions in [0, 1], e.g. 0.90; got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="fast-cpu90", help="comma-separated recipes of ours (default %(default)s)")
    parser.add_argument("--peer", default="airbench94", choices=sorted(PEERS), help="the peer (default %(default)s)")
    parser.add_argument("--peer-script", metavar="PATH", help=f"the peer's script (default: {PEERS['airbench94']} "
                                                              "beside the checkout, else under the current folder)")
    parser.add_argument("--peer-log", metavar="FILE", help="read a saved output of the peer instead of running it")
    parser.add_argument("--peer-dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="the peer's --dtype; auto: what precision auto picks for this CPU")
    parser.add_argument("--peer-epochs", type=float, help="the peer's --epochs (default: its 9.9; smoke runs)")
    parser.add_argument("--data", help=f"JPEG image folder both sides train on (default: {DEFAULT_DATA} beside the "
                                       "checkout, else under the current folder)")
    parser.add_argument("--threads", metavar="N", help="torch threads of both sides (default: $CIFARLAB_THREADS, else "
                                                       "the cores this process may use)")
    parser.add_argument("--runs", type=int, default=1, help="runs per side: seeds 0..N-1, the peer's --runs")
    parser.add_argument("--thresholds", type=_thresholds, default=[0.85, 0.90], help="test accuracies, e.g. 0.85,0.90")
    parser.add_argument("--eval-every", type=int, default=1, help="ours: evaluate every K epochs and the last (1: "
                                                                  "every epoch, the thresholds' resolution)")
    parser.add_argument("--epochs", type=int, help="ours: override the recipes' epochs (smoke runs)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="ours: override the recipes' device")
    parser.add_argument("--train-subset", type=int, help="both: train on N images (smoke runs; see above)")
    parser.add_argument("--test-subset", type=int, help="both: test on N images (smoke runs; see above)")
    parser.add_argument("--csv", default="bench.csv", help="CSV the rows are appended to (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        run(args)
    except (CifarlabError, OSError) as error:
        print(f"peer_speed: error: {error}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    threads = thread_count(args.threads)
    torch.set_num_threads(threads)
    if args.runs < 1 or args.eval_every < 0:
        raise PeerError(f"--runs must be >= 1 and --eval-every >= 0, got {args.runs} and {args.eval_every}")
    data = Path(args.data) if args.data else find_beside_checkout(DEFAULT_DATA)
    if data is None or not (data / "train").is_dir():
        raise PeerError(f"no image folder with train/ and test/ at {args.data or DEFAULT_DATA}; pass --data PATH")
    cpu = torch.device("cpu")
    common = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_name(cpu),
              "device": "cpu", "timed": TIMED}
    print(f"machine: {machine_name(cpu)}; threads {threads}; data {data.resolve()}", flush=True)

    if args.peer_log:
        output, peak_memory_mb = Path(args.peer_log).read_text(encoding="utf-8"), None
        print(f"{args.peer}: read from {args.peer_log} (not run here)", flush=True)
    else:
        dtype = choose_precision(cpu, "auto").precision if args.peer_dtype == "auto" else args.peer_dtype
        csv = Path(args.csv)
        log = csv.parent / f"{csv.stem}-{args.peer}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        output, peak_memory_mb = run_peer(
            peer_script(args.peer, args.peer_script), name=args.peer, threads=threads, data=data, dtype=dtype,
            runs=args.runs, epochs=args.peer_epochs, train_subset=args.train_subset, test_subset=args.test_subset,
            log=log)
    peer = peer_side(args.peer, parse_peer_output(output, name=args.peer), common=common, data=data,
                     peak_memory_mb=peak_memory_mb)
    if peer.fixed["threads"] not in (None, threads):
        print(f"note: {args.peer} ran with {peer.fixed['threads']} threads, ours with {threads}", flush=True)

    ours = []
    for recipe in args.recipes.split(","):
        config, runs = run_ours(recipe, data=data, runs=args.runs, eval_every=args.eval_every, epochs=args.epochs,
                                device=args.device, train_subset=args.train_subset, test_subset=args.test_subset)
        ours.append(our_side(config, runs, common=common))

    print()
    print(side_table([peer, *ours], args.thresholds))
    print()
    print(ratio_table(peer, ours, args.thresholds))
    rows = [row for side in (peer, *ours) for row in side.csv_rows(args.thresholds)]
    print(f"\nrows appended to {append_csv(args.csv, rows)}")


if __name__ == "__main__":
    sys.exit(main())
