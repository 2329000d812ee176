"""Where a training step's time goes: torch.profiler's per-op CPU time for one recipe's model, by op and shape.

Random images stand in for data (the step's cost does not depend on the pixels); the model, batch size, precision,
memory format and optimizer's parameter groups come from the recipe, so the table shows what `cifarlab train`
computes per step. Prints images/s over the timed steps, the ops by self time and the GFLOP/s of each
convolution shape (forward: 2 x MACs; backward: twice that, input and weight gradients).

    python benchmarks/step_profile.py --recipe fast-cpu-muon
    python benchmarks/step_profile.py --recipe fast-cpu --batch-size 256 --precision fp32
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from cifarlab.config import RunConfig, load_recipe
from cifarlab.hardware import autocast_for, cpu_info, resolve_precision
from cifarlab.models import create_model
from cifarlab.train.optim import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fast-cpu-muon")
    parser.add_argument("--batch-size", type=int, help="default: the recipe's")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), help="default: the recipe's")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = RunConfig.from_dict(load_recipe(args.recipe), source=args.recipe)
    batch = args.batch_size or config.train.batch_size
    device = torch.device("cpu")
    precision = resolve_precision(device, args.precision or config.train.precision)
    memory_format = torch.channels_last if config.train.channels_last else torch.contiguous_format
    model = create_model(config.model.name, **config.model.args).to(memory_format=memory_format).train()
    optimizer = build_optimizer(model, config.optim)
    x = torch.randn(batch, 3, 32, 32).to(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,))
    autocast = autocast_for(device, precision)

    def step() -> None:
        with autocast():
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    print(f"{args.recipe}: batch {batch}, {precision}, {args.threads} threads, {cpu_info().model} ({cpu_info().isa}), "
          f"torch {torch.__version__}: {seconds * 1000:.0f} ms a step, {batch / seconds:,.0f} images/s")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key not in ("aten::mkldnn_convolution", "aten::convolution_backward") or not event.input_shapes:
            continue
        if event.key == "aten::convolution_backward":  # (output gradient, input, weight, ...)
            output, weight = event.input_shapes[0], event.input_shapes[2]
            passes = 2  # input and weight gradients (a first layer needs only the latter: an upper bound there)
        else:  # (input, weight, ...); 'same' padding for odd kernels, none for even ones (the whitening's 2x2)
            (n, _, h, w), weight = event.input_shapes[0], event.input_shapes[1]
            k = weight[2]
            pad = k // 2 if k % 2 else 0
            output, passes = [n, weight[0], h + 2 * pad - k + 1, w + 2 * pad - k + 1], 1
        macs = output[0] * output[2] * output[3] * weight[0] * weight[1] * weight[2] * weight[3]
        seconds_each = event.self_cpu_time_total / event.count / 1e6
        print(f"{event.key:28s} weight {str(weight):18s} output {str(output):20s} {seconds_each * 1000:6.1f} ms "
              f"{2 * macs * passes / seconds_each / 1e9:6.0f} GFLOP/s")

if __name__ == "__main__":
    main()
