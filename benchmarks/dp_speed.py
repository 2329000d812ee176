"""DP-SGD step speed: non-private vs Opacus's per-sample gradient paths vs ours, same model, batch and machine.

    python benchmarks/dp_speed.py --models tutorial,cnn,wrn --batch 256 --repeats 5
    python benchmarks/dp_speed.py --models wrn-16-4 --batch 256 --device cuda      # on a GPU machine

For each model (prepared for DP: BatchNorm -> GroupNorm, no in-place ops) and one fixed batch of random
32x32 images, it times a whole optimizer step of
  plain         forward, backward, SGD step (no privacy);
  opacus-hooks  Opacus's default make_private path: GradSampleModule hooks + DPOptimizer (clip, noise, step);
  opacus-ghost  Opacus fast gradient / ghost clipping (two backward passes);
  ours          cifarlab.privacy: PrivateTraining.step (single-pass book-keeping clipping, Opacus noise);
and prints images/s and each step time relative to plain. Timings are the best of `repeats` rounds (the modes
take turns inside a round), the most stable statistic on a shared machine. Noise, clipping and optimizer
settings are the same everywhere (sigma=1, C=1, SGD).

Prints one header line (torch version, device, precision, batch, rounds, wall or CPU time, allocator), then per
model and mode: images/s, step ms and the step time as a multiple of plain. `--precision bf16` (or auto) runs
every mode under bf16 autocast, as training does (weights fp32); `--skip opacus-ghost` leaves a mode out,
`--per-round N` times N steps together, `--no-retain-memory` keeps glibc's default allocator, `--cpu-time`
measures process CPU time instead of wall time. Time it alone on the machine: a second job on the same cores
slows the threads unevenly.
Measured figures (2-core AMD EPYC with AVX-512 BF16): docs/privacy.md.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn

from cifarlab.config import PRECISIONS
from cifarlab.data.loader import BatchLoader
from cifarlab.data.preprocess import fit_preprocessor
from cifarlab.data.sources import Split
from cifarlab.errors import CifarlabError
from cifarlab.models import create_model
from cifarlab.privacy.dpsgd import make_private, prepare_model
from cifarlab.hardware import autocast_for, choose_precision, resolve_device
from cifarlab.train.host_memory import retain_freed_memory

MODELS = {  # name -> create_model arguments
    "tutorial": ("tutorial", {}),
    "cnn": ("cnn", {"dropout": 0.0}),
    "tanh_cnn": ("tanh_cnn", {}),
    "wrn": ("wrn", {"depth": 10, "width": 2, "norm": "group", "weight_standardization": True}),
    "wrn-16-4": ("wrn", {"depth": 16, "width": 4, "norm": "group", "weight_standardization": True}),
}


def step_functions(name: str, batch: int, device: torch.device = torch.device("cpu")) -> dict:
    """mode -> a closure doing one training step on a fixed batch (each mode on its own copy of the model)."""
    model_name, kwargs = MODELS[name]
    base = prepare_model(create_model(model_name, **kwargs)).to(device)
    x, y = torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
    steps = {}

    plain = prepare_model(base)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)

    def plain_step():
        plain_opt.zero_grad(set_to_none=True)
        F.cross_entropy(plain(x), y).backward()
        plain_opt.step()

    steps["plain"] = plain_step

    hooks = GradSampleModule(prepare_model(base))
    hooks_opt = DPOptimizer(torch.optim.SGD(hooks.parameters(), lr=0.01), noise_multiplier=1.0, max_grad_norm=1.0,
                            expected_batch_size=batch)

    def hooks_step():
        hooks_opt.zero_grad(set_to_none=True)
        F.cross_entropy(hooks(x), y).backward()
        hooks_opt.step()

    steps["opacus-hooks"] = hooks_step

    ghost = GradSampleModuleFastGradientClipping(prepare_model(base), max_grad_norm=1.0, use_ghost_clipping=True)
    ghost_opt = DPOptimizerFastGradientClipping(torch.optim.SGD(ghost.parameters(), lr=0.01), noise_multiplier=1.0,
                                                max_grad_norm=1.0, expected_batch_size=batch)
    ghost_loss = DPLossFastGradientClipping(ghost, ghost_opt, nn.CrossEntropyLoss())

    def ghost_step():
        ghost_opt.zero_grad(set_to_none=True)
        ghost_loss(ghost(x), y).backward()
        ghost_opt.step()

    steps["opacus-ghost"] = ghost_step

    ours_model = prepare_model(base)
    fake = Split(images=torch.zeros(10 * batch, 3, 1, 1, dtype=torch.uint8), labels=torch.zeros(10 * batch, dtype=torch.long))
    loader = BatchLoader(fake, batch_size=batch, preprocess=fit_preprocessor("none", fake.images))
    private = make_private(ours_model, torch.optim.SGD(ours_model.parameters(), lr=0.01), loader, epochs=1,
                           max_grad_norm=1.0, noise_multiplier=1.0, accountant="rdp")
    steps["ours"] = lambda: private.step(private.model, x, y)
    return steps


def _cuda_clock() -> float:
    torch.cuda.synchronize()  # kernels run asynchronously: a step is over when the GPU is done with it
    return time.perf_counter()


def measure(steps: dict, *, repeats: int, per_round: int, clock=time.perf_counter) -> dict[str, float]:
    """Best-of-`repeats` seconds per step for each mode."""
    for step in steps.values():  # warm-up (allocations, lazy init)
        step()
    best = {mode: float("inf") for mode in steps}
    for _ in range(repeats):
        for mode, step in steps.items():
            start = clock()
            for _ in range(per_round):
                step()
            best[mode] = min(best[mode], (clock() - start) / per_round)
    return best


def main() -> None:
    warnings.simplefilter("ignore")  # Opacus's full-backward-hook notices, the BatchNorm replacement note
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tutorial,cnn,wrn", help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=2, help="steps timed together in one round")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="fp32 (default, as the figures in docs/privacy.md), bf16 autocast, or auto: bf16 where native")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--retain-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="keep freed host memory in the process, as CPU training does (--no-retain-memory: "
                             "glibc's default, a fresh mmap for every large tensor)")
    parser.add_argument("--skip", default="", help="comma-separated modes to leave out, e.g. opacus-ghost")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the process's CPU time instead of wall time: with --threads 1 on a shared "
                             "machine this is the step's own compute, unaffected by other processes' load")
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)
    except CifarlabError as error:
        parser.error(str(error))
    if args.cpu_time and device.type != "cpu":
        parser.error("--cpu-time measures CPU work; it cannot time GPU kernels")
    if args.threads:
        torch.set_num_threads(args.threads)
    # as every CPU training run does (cifarlab.train.engine.fit): every mode reuses its pages step to step
    retained = args.retain_memory and retain_freed_memory()
    torch.manual_seed(0)
    clock = time.process_time if args.cpu_time else time.perf_counter
    if device.type == "cuda":
        clock = _cuda_clock
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    autocast, precision = autocast_for(device, args.precision), choose_precision(device, args.precision)
    print(f"torch {torch.__version__}, {where}, {precision.precision} ({precision.reason}), batch {args.batch}, "
          f"best of {args.repeats} rounds x {args.per_round} steps, {'CPU' if args.cpu_time else 'wall'} time, "
          f"freed memory {'retained' if retained else 'returned (glibc default)'}")
    header = f"{'model':10s} {'mode':13s} {'images/s':>9s} {'step ms':>9s} {'x plain':>8s}"
    print(header)
    for name in args.models.split(","):
        steps = step_functions(name, args.batch, device)
        for mode in filter(None, args.skip.split(",")):
            steps.pop(mode)
        for mode, step in list(steps.items()):  # Opacus's DPOptimizer fails under bf16 autocast: say so, time the rest
            try:
                with autocast():
                    step()
            except RuntimeError as error:
                print(f"{name:10s} {mode:13s} fails: {str(error).splitlines()[0][:90]}", flush=True)
                steps.pop(mode)
        with autocast():
            seconds = measure(steps, repeats=args.repeats, per_round=args.per_round, clock=clock)
        for mode, s in seconds.items():
            print(f"{name:10s} {mode:13s} {args.batch / s:9.0f} {1000 * s:9.1f} {s / seconds['plain']:8.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
