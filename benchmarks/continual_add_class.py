"""Seconds to add one class to a saved continual state from a folder of its images, on CPU.

End to end, what a user waits for: `cifarlab continual add --state S --class-name X --images DIR` as a new
process (Python and library start-up, load the state and the backbone, decode every image, extract features,
update the statistics, save the state atomically), on a fresh copy of the state each repeat. Then the same work
stage by stage, in this process, with the functions `add_class_from_folder` calls:

    python benchmarks/continual_add_class.py --images ../shared/datasets/cifar10-jpeg/train/truck \
        --state runs/continual-fast/continual/state.pt

Without --state, a backbone with random weights stands in (the weights do not change the cost): --recipe gives
the model and its arguments, --model-arg overrides them (e.g. tta=1: mirror test-time augmentation only), and
the state has learned no class yet; it runs at the recipe's precision unless --precision says otherwise (fast-cpu:
auto, i.e. bf16 where the CPU has it natively). `--pythonpath OTHER_CHECKOUT` also times the command with that
other copy of the code (to compare two versions), the two taking turns so that a change in the machine's load hits
both alike; the other copy must read this state's format (one that records the features' precision):

    git archive <commit> | tar -x -C /tmp/other
    python benchmarks/continual_add_class.py --images ... --model-arg tta=1 --pythonpath /tmp/other

CPU time counts every thread of a process (and the decoding workers), so on an idle machine it can exceed the
wall time. On a busy machine both grow, the CPU time too, since threads that wait for a descheduled partner spin:
time it alone on the machine. The figure that matters is the end-to-end wall time.

Prints the torch version and threads, the backbone, the end-to-end median wall time over --repeats runs, the
stages' wall and CPU seconds, and the load average. Measured figures: docs/continual.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from cifarlab.config import load_recipe
from cifarlab.continual.features import FEATURE_BATCH_SIZE, describe_backbone, extract_features
from cifarlab.continual.state import IMAGE_SUFFIXES, ContinualState, load_state, save_state
from cifarlab.data.preprocess import fit_preprocessor
from cifarlab.data.sources import read_images
from cifarlab.models import create_model
from cifarlab.train.checkpoint import load_model, save_checkpoint
from cifarlab.hardware import resolve_precision

STARTUP = "import cifarlab.cli, cifarlab.continual.state"  # what `cifarlab continual add` imports


def make_state(folder: Path, recipe: str, overrides: dict[str, object], precision: str | None) -> Path:
    """A checkpoint of the recipe's model (random weights, 5 base classes; `overrides` replace model arguments)
    and an empty state over it, at `precision` (default: the recipe's, as `cifarlab continual` resolves it)."""
    loaded = load_recipe(recipe)
    model_config = loaded["model"]
    precision = resolve_precision(torch.device("cpu"), precision or loaded.get("train", {}).get("precision", "auto"))
    name, args = model_config["name"], {**model_config.get("args", {}), **overrides}
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, **args)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    # A minimal config (the rest defaults): older cifarlab versions read it too.
    config = {"model": {"name": name, "args": args}, "data": {"classes": [0, 1, 2, 3, 4]}}
    checkpoint = save_checkpoint(folder / "base.pt", config=config, model_state=model.state_dict(),
                                 preprocess=fit_preprocessor("normalize", images).state(),
                                 classes=list("abcde"), epoch=0)
    loaded = load_model(checkpoint)
    model, preprocess = loaded.model, loaded.preprocess
    dim = extract_features(model, images[:2], preprocess=preprocess).shape[1]
    backbone = describe_backbone(model, preprocess, precision=precision, checkpoint=str(checkpoint.resolve()))
    return save_state(folder / "state.pt", ContinualState.empty(backbone, dim))


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the image decoding workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed_process(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall s, CPU s of the child) of running `command` to completion; raises if it fails."""
    before, wall = os.times(), time.perf_counter()
    # From a neutral folder: `python -m/-c` put the working directory first on sys.path, and a cifarlab checkout
    # there would shadow the one chosen by PYTHONPATH.
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    wall, after = time.perf_counter() - wall, os.times()
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr}")
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def end_to_end(state: Path, images: Path, *, repeats: int,
               envs: dict[str, dict[str, str]]) -> dict[str, list[tuple[float, float]]]:
    """`cifarlab continual add` on a fresh copy of `state` each time, with each environment (version of the code)
    in turn, `repeats` rounds: {version: [(wall s, CPU s)]}."""
    times: dict[str, list[tuple[float, float]]] = {label: [] for label in envs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for label, env in envs.items():
                copy = shutil.copy(state, Path(tmp) / "state.pt")
                times[label].append(timed_process([sys.executable, "-m", "cifarlab", "continual", "add", "--state",
                                                   str(copy), "--class-name", "benchmark-class", "--images",
                                                   str(images), "--device", "cpu"], env))
    return times


def stages(state_path: Path, images_dir: Path, env: dict[str, str]) -> dict[str, tuple[float, float]]:
    """The work of `cifarlab continual add`, one stage at a time: {stage: (wall s, CPU s)}."""
    times = {"start-up (new process, imports)": timed_process([sys.executable, "-c", STARTUP], env)}
    start = (time.perf_counter(), cpu_seconds())

    def lap(name: str) -> None:
        nonlocal start
        now = (time.perf_counter(), cpu_seconds())
        times[name] = (now[0] - start[0], now[1] - start[1])
        start = now

    state = load_state(state_path)
    loaded = load_model(state.backbone.checkpoint, device="cpu")
    model, preprocess = loaded.model, loaded.preprocess
    saved = state.backbone
    backbone = describe_backbone(model, preprocess, layer=saved.layer, image_size=saved.image_size,
                                 precision=saved.precision, checkpoint=saved.checkpoint)
    lap("load state + backbone, fingerprint")
    files = sorted(str(p) for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    images = torch.from_numpy(read_images(files, size=(saved.image_size, saved.image_size)))
    lap(f"decode {len(files)} images")
    features = extract_features(model, images, preprocess=preprocess, layer=saved.layer, precision=saved.precision)
    lap(f"features {tuple(features.shape)}")
    new_state = state.add_class("benchmark-class", features.split(FEATURE_BATCH_SIZE), backbone=backbone)
    lap("update statistics (float64)")
    with tempfile.TemporaryDirectory() as tmp:
        save_state(Path(tmp) / "state.pt", new_state)
        lap("save state")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of one class's images")
    parser.add_argument("--state", type=Path, help="a saved state (default: an empty one over --recipe's model)")
    parser.add_argument("--recipe", default="fast-cpu", help="without --state: the model of this recipe")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="without --state: override a model argument of the recipe")
    parser.add_argument("--precision", choices=("fp32", "bf16"),
                        help="without --state: the backbone's precision (default: the recipe's train.precision)")
    parser.add_argument("--repeats", type=int, default=3, help="end-to-end runs (the median is the figure)")
    parser.add_argument("--pythonpath", type=Path,
                        help="also time the command with the cifarlab package of this checkout (e.g. an older one)")
    args = parser.parse_args()
    args.images = args.images.resolve()
    overrides = {}
    for item in args.model_arg:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--model-arg expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    envs = {"this checkout": dict(os.environ)}
    if args.pythonpath:
        paths = [str(args.pythonpath.resolve()), os.environ.get("PYTHONPATH")]
        envs[str(args.pythonpath)] = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    for label, env in envs.items():
        where = subprocess.run([sys.executable, "-c", "import cifarlab.cli; print(cifarlab.cli.__file__)"], env=env,
                               capture_output=True, text=True, check=True, cwd=tempfile.gettempdir()).stdout.strip()
        print(f"{label}: the command runs {where}")
    with tempfile.TemporaryDirectory() as tmp:
        state = args.state.resolve() if args.state else make_state(Path(tmp), args.recipe, overrides, args.precision)
        print(f"backbone: {load_state(state).backbone.describe()}")
        for label, runs in end_to_end(state, args.images, repeats=args.repeats, envs=envs).items():
            walls = [wall for wall, _ in runs]
            print(f"{label}: end to end, {len(runs)} runs: median {statistics.median(walls):.2f} s wall (runs: "
                  f"{', '.join(f'{w:.2f}' for w in walls)}), median {statistics.median(c for _, c in runs):.2f} s CPU")
        print("this checkout, by stage (wall, CPU):")
        breakdown = stages(state, args.images, envs["this checkout"])
        for stage, (wall, cpu) in breakdown.items():
            print(f"    {stage:40s} {wall:6.2f} s {cpu:6.2f} s")
        print(f"    {'sum':40s} {sum(w for w, _ in breakdown.values()):6.2f} s")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
