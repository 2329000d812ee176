"""Training images/s: cifarlab's batched in-memory pipeline vs the notebooks' per-sample DataLoader pipeline.

Both train the same model with the same batch size, optimizer and augmentation (random crop with 4 px padding +
horizontal flip + normalisation) on the same machine. The notebook pipeline is what torchvision's CIFAR10 dataset
with `transforms.Compose([RandomCrop(32, 4), RandomHorizontalFlip(), ToTensor(), Normalize(...)])` does: per
sample, array -> PIL image -> crop/flip in PIL -> tensor -> normalise, collated by a DataLoader with workers. It is
written here with Pillow alone because torchvision is not a dependency.

    python benchmarks/pipeline_speed.py --data ../shared/datasets/cifar10-jpeg --model tutorial --batch-size 128
    python benchmarks/pipeline_speed.py --model resnet18 --precision bf16 --channels-last   # cifarlab's CPU options

`--precision`, `--channels-last` and `--compile` apply to the cifarlab side only (what `cifarlab train` offers); the
notebook side always trains in fp32, NCHW, as the notebooks do. The printed ratio says which was used.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from cifarlab.config import DataConfig
from cifarlab.data.loader import prepare_data
from cifarlab.models import create_model
from cifarlab.hardware import autocast_for


class NotebookDataset(torch.utils.data.Dataset):
    """Per-sample PIL augmentation, as in the PyTorch CIFAR-10 notebooks."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
        self.images, self.labels, self.mean, self.std = images, labels, mean, std  # images (N, H, W, 3) uint8

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = ImageOps.expand(Image.fromarray(self.images[index]), border=4, fill=0)
        left, top = np.random.randint(0, 9, size=2)
        image = image.crop((left, top, left + 32, top + 32))
        if np.random.rand() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        array = (np.asarray(image, dtype=np.float32) / 255 - self.mean) / self.std
        return torch.from_numpy(array.transpose(2, 0, 1).copy()), int(self.labels[index])


def train_steps(model: torch.nn.Module, batches, steps: int, warmup: int = 3, *,
                autocast=contextlib.nullcontext, memory_format=torch.contiguous_format) -> float:
    """Images/s over `steps` SGD steps after `warmup` untimed ones."""
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    seen, start = 0, None
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            seen, start = 0, time.perf_counter()
        with autocast():
            loss = F.cross_entropy(model(x.contiguous(memory_format=memory_format)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(y)
        if i + 1 == warmup + steps:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/datasets/cifar10-jpeg")
    parser.add_argument("--model", default="tutorial")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the notebook pipeline")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="cifarlab side only")
    parser.add_argument("--channels-last", action="store_true", help="cifarlab side only")
    parser.add_argument("--compile", action="store_true",
                        help="cifarlab side only: torch.compile the model (compiled during the untimed warm-up)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    data = prepare_data(
        DataConfig(path=args.data, crop_padding=4, flip=True), device=device, seed=0,
        batch_size=args.batch_size, eval_batch_size=1000, progress=False,
    )  # fmt: skip
    model = create_model(args.model)
    if args.compile:
        model = torch.compile(model)
    ours = train_steps(model, data.train.batches(torch.Generator().manual_seed(0)), args.steps,
                       autocast=autocast_for(device, args.precision),
                       memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)

    images = data.train.images.permute(0, 2, 3, 1).numpy()
    mean = data.preprocess.state()["mean"].reshape(1, 1, 3).numpy()
    std = data.preprocess.state()["std"].reshape(1, 1, 3).numpy()
    dataset = NotebookDataset(images, data.train.labels.numpy(), mean, std)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, persistent_workers=args.workers > 0
    )
    model = create_model(args.model)
    notebook = train_steps(model, iter(loader), args.steps)
    print(f"model {args.model}, batch {args.batch_size}, {args.steps} steps, {torch.get_num_threads()} threads")
    print(f"{'pipeline':<34}{'images/s':>10}")
    print(f"{'notebook (PIL + DataLoader, ' + str(args.workers) + ' workers)':<34}{notebook:>10.0f}")
    layout = (", channels_last" if args.channels_last else "") + (", compiled" if args.compile else "")
    print(f"{'cifarlab (batched, in memory, ' + args.precision + layout + ')':<34}{ours:>10.0f}")
    print(f"ratio cifarlab / notebook: {ours / notebook:.2f}x")


if __name__ == "__main__":
    main()
