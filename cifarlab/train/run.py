"""One way to build a run (`build_run`), used by `cifarlab train` (`run_training`), the benchmark, uncertainty
runs, the continual protocol's base run and the privacy audit, so that they cannot drift apart.

Order: pick the device, load the data, seed, build the model, compute its frozen prefix once, choose the training
variant (plain, DP-SGD, SGLD, SGLD-DP), fit its data-dependent layers, train with the one engine, then evaluate
the best checkpoint on the test set and write summary.json and report.md.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from cifarlab.config import DEFAULT_DELTA, RunConfig
from cifarlab.data.loader import BatchLoader, TrainData, prepare_data
from cifarlab.data.sources import Split
from cifarlab.errors import CifarlabError, ConfigError
from cifarlab.hardware import autocast_for, resolve_device
from cifarlab.io import check_writable_folder, write_json, write_yaml
from cifarlab.metrics import confusion_matrix, per_class_accuracy
from cifarlab.models import create_model
from cifarlab.models.prior import frozen_prior, load_prior
from cifarlab.models.scatter import unfitted_data_norm
from cifarlab.report.run_report import write_run_report
from cifarlab.train import distributed
from cifarlab.train.checkpoint import read_checkpoint
from cifarlab.train.engine import FitResult, evaluate, fit, plain_training
from cifarlab.train.optim import build_optimizer
from cifarlab.train.variant import TrainingVariant

if TYPE_CHECKING:  # the privacy package imports Opacus: only private runs load it
    from cifarlab.privacy.dpsgd import PrivateTraining


def default_run_dir(config: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{config.model.name.replace(':', '-')}"


def init_model_from_data(model: torch.nn.Module, data: TrainData, *, count: int = 5000) -> None:
    """Let a model that defines `init_from_data` fit its data-dependent layers to `count` normalised training images.

    The images are evenly strided through the training split (whose order may be sorted by class), not augmented.
    A model with data normalisation (`scatter_*` with data_norm) gets it fitted on the whole training split, unless
    a DP run has fitted it privately already.
    """
    if hasattr(model, "init_from_data"):
        images = data.train.images[:: max(1, data.train.num_examples // count)][:count]
        model.init_from_data(data.preprocess.from_uint8(images))
    if unfitted_data_norm(model):
        from cifarlab.privacy.datanorm import fit_data_norm  # imports Opacus: only for such models

        fit_data_norm(model, data.train)


def precompute_frozen_prefix(model: torch.nn.Module, data: TrainData, *, progress: bool = True) -> TrainData | None:
    """The data with every split's images replaced by `model.frozen_prefix(images)` (or by the model's frozen prior
    layers' outputs), or None where that would change the run: the model has no frozen prefix, or training augments
    (then each epoch sees other inputs).

    A frozen prefix is a fixed function of each image alone (the scattering transform of `scatter_*`, a frozen prior
    learned without the data, cifarlab.models.prior): computing it once instead of every epoch gives the same
    batches, and DP-SGD the same guarantee, since the prefix looks at one image at a time and at no statistic of
    the data.
    """
    train = data.train
    augments = train.views > 1 or (train.augment is not None and not train.augment.is_identity)
    prefix = model.frozen_prefix if hasattr(model, "frozen_prefix") else frozen_prior(model)
    if prefix is None or augments:
        return None
    model.to(train.images.device)

    def precomputed(loader: BatchLoader, name: str) -> BatchLoader:
        inputs, start = None, 0
        for chunk in tqdm(loader.images.split(PREFIX_CHUNK), desc=f"frozen prefix, {name}", unit="batch",
                          disable=not progress):
            out = prefix(loader.transform(chunk))
            if inputs is None:  # filled in place: no second copy, as torch.cat of the chunks would make
                inputs = out.new_empty((loader.num_examples, *out.shape[1:]))
            inputs[start:start + len(chunk)] = out
            start += len(chunk)
        return loader.replace(Split(inputs, loader.labels))

    evals = {name: precomputed(loader, name) for name, loader in data.evals.items()}
    return dataclasses.replace(data, train=precomputed(train, "train"), evals=evals)


PREFIX_CHUNK = 1000  # images per frozen-prefix batch: the scattering of 1,000 images needs ~0.5 GB of work memory


TRAININGS = ("plain", "dp", "sgld", "sgld-dp")  # the training variants a run can be built with


@dataclass
class Run:
    """A run ready to train: `run.fit()`. `data` is what training reads (the frozen prefix precomputed, Poisson
    batches for DP), `prefix_seconds` how long precomputing took (None: not done)."""

    config: RunConfig
    data: TrainData
    model: nn.Module
    variant: TrainingVariant
    run_dir: Path | None
    prefix_seconds: float | None

    def fit(self, *, resume: dict[str, Any] | None = None, eval_from: int = 1) -> FitResult:
        return fit(self.model, data=self.data, config=self.config, variant=self.variant, run_dir=self.run_dir,
                   resume=resume, eval_from=eval_from)


@dataclass
class RunResult:
    """A finished run: its trained model (best.pt's weights on rank 0), metrics rows and summary.json's contents."""

    model: nn.Module
    history: list[dict[str, float | None]]
    run_dir: Path | None  # None on torchrun ranks other than 0, which write nothing
    summary: dict[str, Any]


def build_data(config: RunConfig, *, device: torch.device) -> TrainData:
    """The run's data on `device`: subsets, validation hold-out and preprocessing as config.data says."""
    return prepare_data(config.data, device=device, seed=config.train.seed, batch_size=config.train.batch_size,
                        eval_batch_size=config.train.eval_batch_size, progress=config.train.progress)


def build_run(config: RunConfig, *, data: TrainData, training: str | None = None,
              run_dir: Path | None = None) -> Run:
    """The one way a run is assembled: the model (seeded with train.seed) on `data`, its first layers loaded from
    model.prior (frozen with model.freeze_prior), its frozen prefix computed once, the training variant
    (`training`, one of TRAININGS; default "dp" with dp.enabled, else "plain"), its data-dependent layers fitted
    (e.g. `fast`'s patch whitening; a resume then loads the saved ones), and the run folder with config.yaml when
    `run_dir` is given.
    """
    training = training or ("dp" if config.dp.enabled else "plain")
    if training not in TRAININGS:
        raise ConfigError(f"unknown training {training!r}; valid: {', '.join(TRAININGS)}")
    torch.manual_seed(config.train.seed)
    model = create_model(config.model.name, num_classes=len(data.classes), **config.model.args)
    if config.model.prior is not None:  # before DP's prepare_model, whose copy keeps the frozen layers frozen
        load_prior(model, config.model.prior, freeze=config.model.freeze_prior, preprocess=config.data.preprocess)
    start = time.perf_counter()
    precomputed = precompute_frozen_prefix(model, data, progress=config.train.progress)
    prefix_seconds = time.perf_counter() - start if precomputed is not None else None
    data = precomputed or data
    variant: TrainingVariant | None = None
    if training in ("dp", "sgld-dp"):  # before any data-dependent init: prepare_model refuses models that have one
        variant = _private_training(model, data, config, training)
        model, data = variant.model, dataclasses.replace(data, train=variant.loader)
    init_model_from_data(model, data)
    if training == "sgld":
        from cifarlab.uncertainty.sgld import SGLDTraining

        variant = SGLDTraining(model, lr=config.optim.lr, num_data=data.train.num_examples,
                               weight_decay=config.optim.weight_decay, temperature=config.uncertainty.temperature,
                               seed=config.train.seed, device=data.train.labels.device,
                               label_smoothing=config.optim.label_smoothing, grad_clip=config.optim.grad_clip)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_yaml(run_dir / "config.yaml", config.to_dict())
    if variant is None:
        variant = plain_training(model, config)
    return Run(config=config, data=data, model=model, variant=variant, run_dir=run_dir, prefix_seconds=prefix_seconds)


def run_training(config: RunConfig, *, resume: str | Path | None = None) -> RunResult:
    """Train per `config` into its run folder, then evaluate the best checkpoint on the test set and write
    summary.json and report.md; `resume` is a run folder or last.pt of a killed run."""
    payload = None
    if resume is not None:
        resume = Path(resume)
        payload = read_checkpoint(resume / "last.pt" if resume.is_dir() else resume)
        if "optimizer_state" not in payload:
            raise CifarlabError(f"{resume} is a best-weights checkpoint; resume from the run's last.pt")
        run_dir = (resume if resume.is_dir() else resume.parent).resolve()
    else:
        run_dir = Path(config.train.out) if config.train.out else default_run_dir(config)
        if (run_dir / "last.pt").exists():
            raise CifarlabError(f"{run_dir} already holds a run; pass --resume {run_dir} or choose another --out")
        check_writable_folder(run_dir, what="run folder")
    device = distributed.setup(resolve_device(config.train.device))  # under torchrun: join the group
    main = distributed.context().is_main  # only rank 0 writes
    run = build_run(config, data=build_data(config, device=device), run_dir=run_dir if main else None)
    result = run.fit(resume=payload)
    if not main:  # rank 0 alone evaluates the best checkpoint and writes the summary
        return RunResult(model=result.model, history=result.history, run_dir=None, summary={})
    best = read_checkpoint(run_dir / "best.pt")
    result.model.load_state_dict(best["model_state"])
    summary = summarize(result, data=run.data, config=config, device=device, best_epoch=best["epoch"] + 1)
    if run.prefix_seconds is not None:
        summary["frozen_prefix_seconds"] = run.prefix_seconds  # once, before training (not in train_seconds)
    if config.dp.enabled:
        summary["privacy"] = run.variant.summary()
        summary.update({key: summary["privacy"][key] for key in PRIVACY_SUMMARY_KEYS})
    write_json(run_dir / "summary.json", summary)
    write_run_report(run_dir)
    return RunResult(model=result.model, history=result.history, run_dir=run_dir, summary=summary)


PRIVACY_SUMMARY_KEYS = ("epsilon", "delta", "noise_multiplier", "sampling_rate", "steps", "poisson")


def _private_training(model: nn.Module, data: TrainData, config: RunConfig, training: str) -> PrivateTraining:
    """DP-SGD as a transformation (a private model, optimizer and Poisson loader): the dp section's, or SGLD-DP's
    configuration of it (uncertainty section)."""
    from cifarlab.privacy.dpsgd import make_private, prepare_model

    dp = config.dp
    delta = DEFAULT_DELTA if dp.delta is None else dp.delta
    if training == "sgld-dp":
        from cifarlab.uncertainty.sgld_dp import make_sgld_dp

        return make_sgld_dp(model, data.train, lr=config.optim.lr, noise_multiplier=config.uncertainty.noise_multiplier,
                            weight_decay=config.optim.weight_decay, temperature=config.uncertainty.temperature,
                            delta=delta, accountant=dp.accountant)
    model = prepare_model(model)
    return make_private(
        model, build_optimizer(model, config.optim), data.train, epochs=config.train.epochs,
        max_grad_norm=dp.max_grad_norm, noise_multiplier=dp.noise_multiplier, target_epsilon=dp.target_epsilon,
        delta=delta, accountant=dp.accountant, poisson=dp.poisson, augmult=dp.augmult,
        physical_batch_size=dp.physical_batch_size, ema=dp.ema, data_norm_noise=dp.data_norm_noise,
        data_norm_clip=dp.data_norm_clip,
    )  # fmt: skip


def summarize(result: FitResult, *, data, config: RunConfig, device: torch.device, best_epoch: int) -> dict[str, Any]:
    """The run's headline numbers, measured on the best checkpoint (best validation epoch when there is a val set)."""
    precision = config.precision_on(device)
    test = evaluate(result.model, data.evals["test"], autocast=autocast_for(device, precision.precision))
    cm = confusion_matrix(test.predictions, test.targets, len(data.classes))
    best_row = result.history[best_epoch - 1]
    return {
        "model": config.model.name,
        "recipe": config.recipe,
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
        "best_epoch": best_epoch,
        "selected_by": result.selection,
        "val_accuracy": best_row.get("val_acc"),
        "final_test_accuracy": result.history[-1]["test_acc"],
        "per_class_accuracy": dict(zip(data.classes, per_class_accuracy(cm).tolist())),
        "epochs": len(result.history),
        "train_seconds": result.train_seconds,
        "images_per_second": result.images_per_second,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "precision": precision.precision,  # what the run computed in, which `auto` leaves to the hardware
        "precision_reason": precision.reason,
        "num_parameters": sum(p.numel() for p in result.model.parameters()),
        "train_images": data.train.num_examples,
        "test_images": len(test.targets),
        "data_source": data.source,
        "classes": list(data.classes),
        "confusion_matrix": cm.tolist(),
        "torch_version": torch.__version__,
    }
