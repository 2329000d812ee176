"""Train a classifier for predictive uncertainty with the one engine, then evaluate it (`evaluate_uncertainty`).

Each method is the ordinary run plus one change:
- none: the plain network (its temperature-scaled version is reported too, when there is a validation set).
- mc-dropout: the same run; at test time `passes` passes with dropout on (the model must have dropout).
- ensemble: `members` ordinary runs with seeds seed, seed+1, ... in member_<k>/.
- sgld: the SGLD optimizer (no momentum; step `sgld_lr`, default optim.lr, with the run's schedule;
  optim.weight_decay as the prior), one posterior sample per epoch after `burn_in` epochs, every `thin` epochs,
  kept in samples/ or in memory.
- sgld-dp: DP-SGD with Li et al.'s clipping norm (per-example clipping of cifarlab.privacy, Opacus's noise) and
  Poisson batches (sgld_dp.py), the step as sgld; one sample per epoch as sgld; metrics.csv gets the epsilon
  spent and the fraction of clipped gradients.

The test set is scored once, at the end (evaluate_uncertainty); during training the engine evaluates only the
validation split, which picks the best epoch and fits the temperature.

Run folder: config.yaml (the resolved RunConfig, with the optimizer as the method ran it), uncertainty.yaml
(this module's options), the engine's metrics.csv / best.pt / last.pt, samples/ or member_<k>/, summary.json,
uncertainty.json and the plots.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cifarlab.config import RunConfig
from cifarlab.data.loader import TrainData, prepare_data
from cifarlab.data.sources import Split, load_dataset, stratified_indices
from cifarlab.errors import CheckpointError, ConfigError
from cifarlab.io import read_yaml, write_json, write_yaml
from cifarlab.models import create_model
from cifarlab.models.scatter import unfitted_data_norm
from cifarlab.privacy.accounting import DEFAULT_DELTA
from cifarlab.train.checkpoint import read_checkpoint
from cifarlab.hardware import resolve_device
from cifarlab.train.engine import fit
from cifarlab.train.run import init_model_from_data
from cifarlab.uncertainty.baselines import dropout_layers, predict_mc_dropout
from cifarlab.uncertainty.evaluate import Predict, evaluate_uncertainty
from cifarlab.uncertainty.ood import CORRUPTIONS, SEVERITIES, held_out_classes
from cifarlab.uncertainty.sgld import SGLD, SampleCollector, predict_posterior
from cifarlab.uncertainty.sgld_dp import SGLDDP

METHODS = ("none", "mc-dropout", "ensemble", "sgld", "sgld-dp")
SAMPLING_METHODS = ("sgld", "sgld-dp")


@dataclass(frozen=True)
class UncertaintyConfig:
    method: str = "sgld"
    members: int = 4  # ensemble (4: the uncertainty-baselines anchor)
    passes: int = 30  # mc-dropout test-time passes
    temperature: float = 1.0  # sgld, sgld-dp: 1 is the Bayes posterior, < 1 a cold one
    # sgld, sgld-dp: step size (None: optim.lr). SGD's momentum m moves weights 1 / (1 - m) times further per
    # step, but SGLD without momentum at lr / (1 - m) stalled the cnn (tested at 0.5): set it per model.
    sgld_lr: float | None = None
    burn_in: int | None = None  # sgld, sgld-dp: epochs before the first sample; None: half of them
    thin: int = 1  # sgld: epochs between samples
    keep: str = "disk"  # sgld: samples as checkpoints in samples/ ("disk") or only in memory ("memory")
    noise_multiplier: float = 1.0  # sgld-dp: sigma; sets the clipping norm C with lr and batch size
    corruptions: list[str] = field(default_factory=lambda: list(CORRUPTIONS))
    severities: list[int] = field(default_factory=lambda: list(SEVERITIES))
    corruption_images: int | None = 1000  # test images per corruption set (each costs one prediction pass)

    def validate(self, epochs: int) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown uncertainty method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.members < 1 or self.passes < 1 or self.thin < 1:
            raise ConfigError(f"members, passes and thin must be >= 1, got {self.members}, {self.passes}, {self.thin}")
        if self.method in SAMPLING_METHODS and not 0 <= self.burn_in_epochs(epochs) < epochs:
            raise ConfigError(f"burn_in ({self.burn_in}) must leave at least one of the {epochs} epochs to sample")
        if self.keep not in ("disk", "memory"):
            raise ConfigError(f"keep must be 'disk' or 'memory', got {self.keep!r}")
        if self.temperature <= 0 or self.noise_multiplier <= 0:
            raise ConfigError("temperature and noise_multiplier must be > 0")
        if self.sgld_lr is not None and not self.sgld_lr > 0:
            raise ConfigError(f"sgld_lr must be > 0 (or None for optim.lr), got {self.sgld_lr}")
        unknown = sorted(set(self.corruptions) - set(CORRUPTIONS))
        if unknown:
            raise ConfigError(f"unknown corruption {unknown[0]!r}; valid: {', '.join(CORRUPTIONS)}")
        if not set(self.severities) <= set(SEVERITIES):
            raise ConfigError(f"severities must be among {SEVERITIES}, got {self.severities}")

    def burn_in_epochs(self, epochs: int) -> int:
        return epochs // 2 if self.burn_in is None else self.burn_in


def train_uncertainty(config: RunConfig, options: UncertaintyConfig, *,
                      run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train per `options.method` into `run_dir` (default config.train.out or runs/<time>-<model>-<method>),
    evaluate, write the run folder, and return summary.json's contents."""
    options.validate(config.train.epochs)
    config = _for_method(config, options)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(run_dir or config.train.out or f"runs/{stamp}-{config.model.name}-{options.method}")
    if (run_dir / "summary.json").exists():
        raise ConfigError(f"{run_dir} already holds a finished run; choose another --out")
    if options.method == "sgld-dp":
        _check_private_model(config)
    write_yaml(run_dir / "config.yaml", config.to_dict())
    write_yaml(run_dir / "uncertainty.yaml", dataclasses.asdict(options))
    device = resolve_device(config.train.device)
    torch.manual_seed(config.train.seed)
    data = _data(config, device, poisson=options.method == "sgld-dp")
    model = _new_model(config, data)
    if options.method == "mc-dropout":
        _check_dropout(model, config.model.name)

    extra: dict[str, Any] = {}
    if options.method == "ensemble":
        states, train_seconds = [], 0.0
        for k in range(options.members):
            member = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=config.train.seed + k))
            torch.manual_seed(member.train.seed)
            net = _new_model(member, data)
            result = fit(net, data=_without_test(data), config=member, run_dir=run_dir / f"member_{k}")
            train_seconds += result.summary["train_seconds"]
            states.append(read_checkpoint(run_dir / f"member_{k}" / "best.pt")["model_state"])
        predict = _posterior(model, states)
    elif options.method in SAMPLING_METHODS:
        collector = SampleCollector(burn_in=options.burn_in_epochs(config.train.epochs), thin=options.thin,
                                    directory=run_dir / "samples" if options.keep == "disk" else None)
        train_seconds, extra = _train_sgld(model, data, config, options, collector, run_dir)
        predict = _posterior(model, collector)
    else:
        train_seconds = fit(model, data=_without_test(data), config=config, run_dir=run_dir).summary["train_seconds"]
        model.load_state_dict(read_checkpoint(run_dir / "best.pt")["model_state"])
        predict = _single(model, options)

    metrics = _evaluate(predict, data, config, options, run_dir)
    summary = {
        "method": options.method,
        "model": config.model.name,
        "epochs": config.train.epochs,
        "train_images": data.train.num_examples,
        "train_seconds": train_seconds,
        "predict_seconds": metrics["predict_seconds"],
        **{k: metrics[k] for k in ("test", "test_ts", "temperature", "ood_auroc", "ood_auroc_ts", "corruption_mean")
           if k in metrics},
        **extra,
        "device": str(device),
        "run_dir": str(run_dir),
    }
    write_json(run_dir / "summary.json", summary)
    return summary


def evaluate_run(run_dir: str | Path, *, device: str = "auto", corruption_images: int | None = None) -> dict[str, Any]:
    """Re-evaluate a finished run folder from its files alone; rewrites uncertainty.json and the plots.

    `corruption_images` overrides the run's setting (e.g. all test images on a GPU).
    """
    run_dir = Path(run_dir)
    for name in ("config.yaml", "uncertainty.yaml"):
        if not (run_dir / name).is_file():
            raise CheckpointError(f"{run_dir} is not an uncertainty run: {name} is missing")
    config = RunConfig.from_dict(read_yaml(run_dir / "config.yaml"), source=str(run_dir / "config.yaml"))
    try:
        options = UncertaintyConfig(**read_yaml(run_dir / "uncertainty.yaml"))
    except TypeError as error:  # unknown or missing keys
        raise CheckpointError(f"{run_dir / 'uncertainty.yaml'} does not match this version: {error}") from None
    if corruption_images is not None:
        options = dataclasses.replace(options, corruption_images=corruption_images)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, device=device, progress=False))
    torch_device = resolve_device(device)
    data = _data(config, torch_device, poisson=False)
    model = create_model(config.model.name, num_classes=len(data.classes), **config.model.args).to(torch_device)
    if options.method == "ensemble":
        predict = _posterior(model, [read_checkpoint(run_dir / f"member_{k}" / "best.pt")["model_state"]
                                     for k in range(options.members)])
    elif options.method in SAMPLING_METHODS:
        if options.keep != "disk":
            raise CheckpointError(f"{run_dir} kept its posterior samples in memory only; train with keep 'disk' "
                                  "to evaluate it later")
        predict = _posterior(model, SampleCollector.from_directory(run_dir / "samples"))
    else:
        model.load_state_dict(read_checkpoint(run_dir / "best.pt")["model_state"])
        predict = _single(model, options)
    return _evaluate(predict, data, config, options, run_dir)


def _for_method(config: RunConfig, options: UncertaintyConfig) -> RunConfig:
    """The run's config as the method trains it (a new object; the caller's is unchanged)."""
    if options.method in SAMPLING_METHODS:  # saved as what it is: SGLD, without momentum
        lr = config.optim.lr if options.sgld_lr is None else options.sgld_lr
        optim = dataclasses.replace(config.optim, optimizer="sgld", lr=lr, momentum=0.0, nesterov=False)
        return dataclasses.replace(config, optim=optim)
    return config


def _check_private_model(config: RunConfig) -> None:
    """sgld-dp: refuse, before any work, a model that would fit layers to the training data outside DP-SGD."""
    model = create_model(config.model.name, **config.model.args)
    if hasattr(model, "init_from_data") or unfitted_data_norm(model):
        raise ConfigError(f"sgld-dp cannot train {config.model.name!r}: it fits layers to statistics of the training "
                          "images, which sgld-dp's privacy guarantee does not cover; use a model without them (cnn, "
                          "wrn with model.args.norm=group, scatter_* without data_norm)")


def _new_model(config: RunConfig, data: TrainData) -> nn.Module:
    """The run's model on the data's device, its data-dependent layers (e.g. `fast`'s whitening) fitted."""
    model = create_model(config.model.name, num_classes=len(data.classes), **config.model.args)
    init_model_from_data(model.to(data.train.images.device), data)
    return model


def _without_test(data: TrainData) -> TrainData:
    """The data as training sees it: the test split is left to the final evaluation."""
    return dataclasses.replace(data, evals={k: v for k, v in data.evals.items() if k != "test"})


def _data(config: RunConfig, device: torch.device, *, poisson: bool) -> TrainData:
    return prepare_data(config.data, device=device, seed=config.train.seed, batch_size=config.train.batch_size,
                        eval_batch_size=config.train.eval_batch_size, sampling="poisson" if poisson else "shuffle",
                        progress=config.train.progress)


def _check_dropout(model: nn.Module, name: str) -> None:
    if not dropout_layers(model):
        raise ConfigError(f"mc-dropout needs a model with dropout; {name!r} has none with p > 0 "
                          "(use cnn or vgg, or wrn or fast with --model-arg dropout=0.3)")


def _train_sgld(model: nn.Module, data: TrainData, config: RunConfig, options: UncertaintyConfig,
                collector: SampleCollector, run_dir: Path) -> tuple[float, dict[str, Any]]:
    n = data.train.num_examples
    dp = None
    if options.method == "sgld-dp":
        dp = SGLDDP(model, lr=config.optim.lr, num_data=n, batch_size=config.train.batch_size,
                    noise_multiplier=options.noise_multiplier, weight_decay=config.optim.weight_decay,
                    temperature=options.temperature, delta=config.dp.delta or DEFAULT_DELTA,
                    accountant=config.dp.accountant)
        optimizer, train_step = dp.optimizer, dp.train_step
    else:
        optimizer = SGLD(model.parameters(), lr=config.optim.lr, num_data=n, weight_decay=config.optim.weight_decay,
                         temperature=options.temperature)
        train_step = None

    def on_epoch_end(epoch: int, net: nn.Module) -> dict[str, float]:
        collector.offer(epoch, net)
        row = {"posterior_samples": float(len(collector))}
        if dp is not None:
            row.update(epsilon=dp.epsilon(), clipped_fraction=dp.clipped_fraction())
        return row

    result = fit(model, data=_without_test(data), config=config, run_dir=run_dir, optimizer=optimizer,
                 train_step=train_step, on_epoch_end=on_epoch_end)
    extra: dict[str, Any] = {"posterior_samples": len(collector)}
    if dp is not None:
        extra.update(epsilon=dp.epsilon(), delta=dp.delta, noise_multiplier=dp.noise_multiplier,
                     max_grad_norm=dp.max_grad_norm, clipped_fraction=dp.clipped_fraction(), steps=dp.steps)
    return result.summary["train_seconds"], extra


def _posterior(model: nn.Module, samples: Any) -> Predict:
    return lambda x: predict_posterior(model, samples, x)


def _single(model: nn.Module, options: UncertaintyConfig) -> Predict:
    if options.method == "mc-dropout":
        return lambda x: predict_mc_dropout(model, x, passes=options.passes)
    return _posterior(model, [model.state_dict()])


def _evaluate(predict: Predict, data: TrainData, config: RunConfig, options: UncertaintyConfig,
              run_dir: Path) -> dict[str, Any]:
    test = data.evals["test"]
    val = data.evals.get("val")
    torch.manual_seed(config.train.seed)  # MC dropout masks
    return evaluate_uncertainty(
        predict,
        test=Split(test.images, test.labels),
        preprocess=data.preprocess,
        val=None if val is None else Split(val.images, val.labels),
        ood_images=_held_out_images(config, test.images.device),
        corruptions=options.corruptions,
        severities=options.severities,
        corruption_images=options.corruption_images,
        seed=config.train.seed,
        out_dir=run_dir,
        title=f"{config.model.name}, {options.method}",
    )


def _held_out_images(config: RunConfig, device: torch.device) -> Tensor | None:
    """Test images of the classes left out by data.classes (as many as the test subset, if one is set)."""
    if config.data.classes is None:
        return None
    dataset = load_dataset(config.data.path, name=config.data.dataset, download=config.data.download, progress=False)
    held_out = held_out_classes(dataset.test, config.data.classes)
    if held_out is None:
        return None
    if config.data.test_subset is not None and config.data.test_subset < len(held_out):
        held_out = held_out.subset(stratified_indices(held_out.labels, config.data.test_subset, seed=config.train.seed))
    return held_out.images.to(device)


COMPARISON_COLUMNS = ("run", "method", "model", "epochs", "acc %", "NLL", "Brier", "ECE %", "ECE floor %", "OOD AUROC",
                      "corr acc %", "corr ECE %", "corr AUROC", "train s", "predict s")


def comparison_rows(run_dirs: list[str | Path]) -> list[dict[str, Any]]:
    """The issue's comparison table from uncertainty run folders (their summary.json): one row per run, and one
    more, "<method> + TS", with its temperature-scaled predictions where the run had a validation split.

    OOD AUROC: held-out classes against the test set; corr: means over corruptions and severities 1-5 (AUROC:
    corrupted against clean copies). ECE floor: the ECE of a perfectly calibrated predictor with the same
    confidences on as many images. Columns a run predates are None.
    """
    rows = []
    for run_dir in map(Path, run_dirs):
        path = run_dir / "summary.json"
        if not path.is_file():
            raise CheckpointError(f"{run_dir} has no summary.json: not a finished uncertainty run")
        s = json.loads(path.read_text(encoding="utf-8"))
        common = {"run": run_dir.name, "model": s["model"], "epochs": s["epochs"], "train s": s["train_seconds"],
                  "predict s": s["predict_seconds"]}
        rows.append({**common, "method": s["method"], **_scores(s, "")})
        if "test_ts" in s:
            rows.append({**common, "method": f"{s['method']} + TS", **_scores(s, "_ts")})
    return rows


def _scores(summary: dict[str, Any], suffix: str) -> dict[str, float | None]:
    """The table's metric columns of a summary: the method's own ("") or after temperature scaling ("_ts")."""
    test = summary[f"test{suffix}"]
    shift = summary.get("corruption_mean", {})

    def percent(value: float | None) -> float | None:
        return None if value is None else 100 * value

    return {
        "acc %": 100 * test["accuracy"],
        "NLL": test["nll"],
        "Brier": test.get("brier"),
        "ECE %": 100 * test["ece"],
        "ECE floor %": percent(test.get("ece_floor")),
        "OOD AUROC": summary.get(f"ood_auroc{suffix}"),
        "corr acc %": percent(shift.get("accuracy")),  # temperature scaling keeps every prediction's class
        "corr ECE %": percent(shift.get(f"ece{suffix}")),
        "corr AUROC": shift.get(f"auroc_vs_clean{suffix}"),
    }
