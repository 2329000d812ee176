"""Seconds to add one class to a saved continual state from a folder of its images, on CPU.

What `cifarlab continual add --state S --class-name X --images DIR` does, timed end to end
(load state, rebuild the backbone, read every image, extract features, update the statistics,
save the state atomically) and then stage by stage. The backbone's weights do not change the
cost, so a freshly initialised model of the chosen architecture stands in for a trained one.

    python benchmarks/continual_add_class.py --images ../shared/datasets/cifar10-jpeg/train/dog \
        --models tutorial tutorial_deep cnn_bn resnet

CPU time (time.process_time) counts every thread of the process, so on an idle machine it
can exceed the wall time; on a shared, overloaded one the wall time is the larger.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cifarlab.config import RunConfig
from cifarlab.continual.features import describe_backbone, extract_features
from cifarlab.continual.state import IMAGE_SUFFIXES, ContinualState, add_class_from_folder, save_state
from cifarlab.data.preprocess import fit_preprocessor
from cifarlab.models import create_model
from cifarlab.train.checkpoint import load_model, save_checkpoint
from cifarlab.train.inference import read_image


def make_state(folder: Path, model_name: str) -> Path:
    """A base checkpoint of `model_name` (random weights) and an empty state over it."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=5)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    config = RunConfig.from_dict({"model": {"name": model_name}, "data": {"classes": [0, 1, 2, 3, 4]}})
    checkpoint = save_checkpoint(folder / "base.pt", config=config.to_dict(), model_state=model.state_dict(),
                                 preprocess=fit_preprocessor("normalize", images).state(),
                                 classes=list("abcde"), epoch=0)
    model, preprocess, _, _ = load_model(checkpoint)
    dim = extract_features(model, images[:2], preprocess=preprocess).shape[1]
    backbone = describe_backbone(model, preprocess, checkpoint=str(checkpoint))
    return save_state(folder / "state.pt", ContinualState.empty(backbone, dim))


def stages(state_path: Path, images_dir: Path) -> dict[str, tuple[float, float]]:
    """The same work as add_class_from_folder, one stage at a time: {stage: (wall s, CPU s)}."""
    times, start = {}, (time.perf_counter(), time.process_time())

    def lap(name: str) -> None:
        nonlocal start
        now = (time.perf_counter(), time.process_time())
        times[name] = (now[0] - start[0], now[1] - start[1])
        start = now

    model, preprocess, _, _ = load_model(state_path.parent / "base.pt")
    backbone = describe_backbone(model, preprocess, checkpoint=str(state_path.parent / "base.pt"))
    lap("load backbone + fingerprint")
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    images = torch.stack([read_image(path, (32, 32)) for path in files])
    lap(f"read {len(files)} images")
    features = extract_features(model, images, preprocess=preprocess)
    lap(f"extract features {tuple(features.shape)}")
    ContinualState.empty(backbone, features.shape[1]).add_class("x", features.split(500), backbone=backbone)
    lap("update statistics (float64)")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of one class's images")
    parser.add_argument("--models", nargs="+", default=["tutorial", "cnn_bn"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            state_path = make_state(Path(tmp), name)
            wall, cpu = time.perf_counter(), time.process_time()
            state = add_class_from_folder(state_path, "new", args.images, device="cpu")
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            n = state.stats.per_class[0].count
            print(f"{name}: added {n} images in {wall:.2f} s wall, {cpu:.2f} s CPU, end to end "
                  f"(feature dim {state.stats.dim}); by stage (wall, CPU):")
            for stage, (wall, cpu) in stages(state_path, args.images).items():
                print(f"    {stage:40s} {wall:6.2f} s {cpu:6.2f} s")


if __name__ == "__main__":
    main()
