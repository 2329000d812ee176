"""A prior for DP-SGD that costs no privacy: a model's first layers learned from images of random processes.

Tang, Panda, Sehwag, Mittal 2023, "Differentially Private Image Classification by Learning Priors from Random
Processes" (DP-RandP, NeurIPS; arXiv:2306.06076), phase I: learn a representation from synthetic images
(cifarlab.data.synthetic, after Baradad et al. 2021) with contrastive learning, no real image involved, so the
later private runs spend their whole budget on the real data. Those runs load it with `model.prior` and train
only the rest (`model.freeze_prior: true`, DP-RandP's linear-probing phase) or everything from it (`false`).

The representation learning is SimCLR (Chen, Kornblith, Norouzi, Hinton 2020, arXiv:2002.05709): two random views
of each image (resized crop, flip, colour jitter, greyscale) pass through the model's `features` and a projection
head, and the NT-Xent loss pulls each pair together against the other views of the batch. It is a training
variant (`ContrastiveTraining`) trained by the one engine; `build_prior` writes a run folder (config.yaml,
metrics.csv, last.pt of the whole contrastive network) with prior.pt (cifarlab.models.prior) and summary.json,
which records how long generating and training took, a cost paid once for every later run and epsilon.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cifarlab.config import RunConfig
from cifarlab.data.augment import color_jitter, random_flip, random_grayscale, random_resized_crop
from cifarlab.data.loader import BatchLoader, TrainData
from cifarlab.data.preprocess import fit_preprocessor
from cifarlab.data.sources import Split
from cifarlab.data.synthetic import random_process_images
from cifarlab.errors import CifarlabError
from cifarlab.hardware import machine_name, resolve_device
from cifarlab.io import check_writable_folder, write_json, write_yaml
from cifarlab.models import create_model
from cifarlab.models.per_example import require_per_example_layers
from cifarlab.models.prior import prior_layers, save_prior
from cifarlab.train.engine import fit
from cifarlab.train.optim import build_optimizer
from cifarlab.train.variant import StatelessVariant, StepResult

IMAGE_SIZE = 32  # CIFAR's side: the prior's layers see images of the size the private runs train on
PREPROCESS = "none"  # inputs in [0, 1]: what DP runs use, since a normalisation fitted on private images leaks
PROJECTION = (512, 128)  # hidden and output widths of the projection head (SimCLR's is 2048-128 on ResNet-50)
JITTER_STRENGTH = 0.5  # SimCLR's colour-jitter strength for CIFAR-10
GRAYSCALE_P = 0.2


def nt_xent(z: Tensor, *, temperature: float) -> tuple[Tensor, Tensor]:
    """SimCLR's normalized-temperature cross-entropy for z (2B, D), rows 2i and 2i + 1 the two views of image i.

    Each row is classified among the 2B - 1 others by cosine similarity / temperature, its partner the right class;
    returns the mean loss and, per row, whether the partner is its most similar row (2B,) bool."""
    z = F.normalize(z.float(), dim=1)
    logits = z @ z.T / temperature  # (2B, 2B)
    self_pairs = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pairs, float("-inf"))
    partner = torch.arange(len(z), device=z.device) ^ 1  # 0 <-> 1, 2 <-> 3, ...
    return F.cross_entropy(logits, partner), logits.argmax(1) == partner


@dataclass(frozen=True)
class ContrastiveViews:
    """SimCLR's augmentation of float images in [0, 1]: random resized crop (area fraction in [min_crop, 1]), flip,
    colour jitter (p 0.8), greyscale (p 0.2). A `BatchLoader` with views=2 applies it to each image twice."""

    min_crop: float

    is_identity = False

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        x = random_resized_crop(x, scale=(self.min_crop, 1.0), generator=generator)
        x = random_flip(x, generator=generator)
        x = color_jitter(x, strength=JITTER_STRENGTH, generator=generator)
        return random_grayscale(x, p=GRAYSCALE_P, generator=generator)


class ContrastiveNet(nn.Module):
    """A model's prior layers (`features`, shared, not copied) followed by SimCLR's projection head: flatten,
    linear, ReLU, linear. The head is discarded after pretraining, as in SimCLR."""

    def __init__(self, features: nn.Module, *, image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        self.features = features
        with torch.no_grad():
            width = features(torch.zeros(1, 3, image_size, image_size)).numel()
        hidden, out = PROJECTION
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, out))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (B, 128)


class ContrastiveTraining(StatelessVariant):
    """NT-Xent on the two adjacent views of each image in the batch (cifarlab.train.variant). The engine's
    train_acc is the share of views whose partner is their most similar view in the batch."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, temperature: float) -> None:
        self.optimizer = optimizer
        self.temperature = temperature

    def step(self, model: nn.Module, x: Tensor, y: Tensor) -> StepResult:
        """x (2B, 3, H, W): rows 2i and 2i + 1 are views of image i (y, the image indices, repeats likewise)."""
        loss, hits = nt_xent(model(x), temperature=self.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        images = len(y) // 2
        return StepResult(loss.detach() * images, hits.sum() / 2, images)


def build_prior(config: RunConfig) -> dict[str, Any]:
    """Draw config.pretrain.images synthetic images (seed train.seed), train config.model.name's prior layers on them
    with SimCLR for train.epochs epochs (optim, train sections as for any run), and write the run folder
    train.out (needed) with prior.pt and summary.json. Returns the summary."""
    if config.train.out is None:
        raise CifarlabError("build_prior needs train.out, the folder to write the prior into")
    out = Path(config.train.out)
    if (out / "prior.pt").exists() or (out / "last.pt").exists():
        raise CifarlabError(f"{out} already holds a prior; choose another --out")
    check_writable_folder(out, what="prior folder")
    pretrain = config.pretrain
    torch.manual_seed(config.train.seed)
    model = create_model(config.model.name, **config.model.args)
    features = prior_layers(model)
    # DP-SGD has no per-example gradients through batch norm; a prior with it could not serve a private run.
    require_per_example_layers(features, purpose="a prior for DP-SGD",
                               fix="choose a model whose features have no batch norm (cnn, tanh_cnn, tutorial*)")
    device = resolve_device(config.train.device)

    start = time.perf_counter()
    images = random_process_images(pretrain.images, seed=config.train.seed, size=IMAGE_SIZE,
                                   processes=pretrain.processes)
    generate_seconds = time.perf_counter() - start
    preprocess = fit_preprocessor(PREPROCESS, images).to(device)
    split = Split(images=images.to(device), labels=torch.arange(len(images), device=device))
    # drop_last: every batch has at least two images, so each view has negatives to be told apart from.
    loader = BatchLoader(split, batch_size=config.train.batch_size, preprocess=preprocess,
                         augment=ContrastiveViews(pretrain.min_crop), sampling="shuffle", views=2, drop_last=True)
    data = TrainData(train=loader, evals={}, preprocess=preprocess, classes=(),
                     source=f"random processes: {', '.join(pretrain.processes)}")

    net = ContrastiveNet(features)
    variant = ContrastiveTraining(build_optimizer(net, config.optim), temperature=pretrain.temperature)
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(out / "config.yaml", config.to_dict())
    result = fit(net, data=data, config=config, variant=variant, run_dir=out)
    last = result.history[-1]
    summary = {
        "model": config.model.name,
        "layers": "features",
        "num_parameters": sum(p.numel() for p in features.parameters()),
        "images": pretrain.images,
        "processes": list(pretrain.processes),
        "seed": config.train.seed,
        "epochs": len(result.history),
        "temperature": pretrain.temperature,
        "final_loss": last["train_loss"],
        "final_pair_accuracy": last["train_acc"],  # views whose partner is their nearest view in the batch
        "generate_seconds": generate_seconds,
        "train_seconds": result.train_seconds,
        "images_per_second": result.images_per_second,
        "device": machine_name(device),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    save_prior(out / "prior.pt", model, preprocess=PREPROCESS,
               facts={key: summary[key] for key in ("images", "processes", "seed", "epochs", "final_loss")})
    write_json(out / "summary.json", summary)
    return summary
