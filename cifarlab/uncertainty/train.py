"""Train a classifier for predictive uncertainty with the one engine, then evaluate it (`evaluate_uncertainty`).

The method and its settings are the `uncertainty` section of the RunConfig (config.UncertaintyConfig). Each method
is the ordinary run (train.run.build_run) plus one change:
- none: the plain network (its temperature-scaled version is reported too, when there is a validation set).
- mc-dropout: the same run; at test time `passes` passes with dropout on (the model must have dropout).
- ensemble: `members` ordinary runs with seeds seed, seed+1, ... in member_<k>/.
- sgld: the SGLD training variant (no momentum; step `sgld_lr`, default optim.lr, with the run's schedule;
  optim.weight_decay as the prior), one posterior sample per epoch after `burn_in` epochs, every `thin` epochs,
  kept in samples/ or in memory.
- sgld-dp: DP-SGD configured as SGLD (Li et al.'s clipping norm, Poisson batches; sgld_dp.py), samples as sgld;
  metrics.csv gets the epsilon spent and the fraction of clipped gradients.

The test set is scored once, at the end (evaluate_uncertainty); during training the engine evaluates only the
validation split, which picks the best epoch and fits the temperature.

Run folder: config.yaml (the resolved RunConfig, with the optimizer as the method ran it), the engine's
metrics.csv / best.pt / last.pt, samples/ or member_<k>/, summary.json, uncertainty.json and the plots.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cifarlab.config import SAMPLING_METHODS, RunConfig
from cifarlab.data.loader import TrainData
from cifarlab.data.sources import Split, load_dataset, stratified_indices
from cifarlab.errors import CheckpointError, ConfigError
from cifarlab.hardware import resolve_device
from cifarlab.io import check_writable_folder, read_yaml, write_json, write_yaml
from cifarlab.models import create_model
from cifarlab.models.scatter import unfitted_data_norm
from cifarlab.train.checkpoint import read_checkpoint
from cifarlab.train.run import build_data, build_run
from cifarlab.uncertainty.baselines import dropout_layers, predict_mc_dropout
from cifarlab.uncertainty.evaluate import Predict, evaluate_uncertainty
from cifarlab.uncertainty.ood import held_out_classes
from cifarlab.uncertainty.sgld import PosteriorSampling, SampleCollector, predict_posterior


def train_uncertainty(config: RunConfig, *, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train per config.uncertainty into `run_dir` (default config.train.out or runs/<time>-<model>-<method>),
    evaluate, write the run folder, and return summary.json's contents."""
    options = config.uncertainty
    config = _for_method(config)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(run_dir or config.train.out or f"runs/{stamp}-{config.model.name}-{options.method}")
    if (run_dir / "summary.json").exists():
        raise ConfigError(f"{run_dir} already holds a finished run; choose another --out")
    check_writable_folder(run_dir, what="run folder")
    _check_model(config)
    device = resolve_device(config.train.device)
    data = build_data(config, device=device)
    training_data = _without_test(data)

    extra: dict[str, Any] = {}
    if options.method == "ensemble":
        write_yaml(run_dir / "config.yaml", config.to_dict())
        states, train_seconds = [], 0.0
        for k in range(options.members):
            member = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=config.train.seed + k))
            run = build_run(member, data=training_data, run_dir=run_dir / f"member_{k}")
            train_seconds += run.fit().train_seconds
            states.append(read_checkpoint(run_dir / f"member_{k}" / "best.pt")["model_state"])
        predict = _posterior(run.model, states)
    elif options.method in SAMPLING_METHODS:
        collector = SampleCollector(burn_in=options.burn_in_epochs(config.train.epochs), thin=options.thin,
                                    directory=run_dir / "samples" if options.keep == "disk" else None)
        run = build_run(config, data=training_data, training=options.method, run_dir=run_dir)
        chain = run.variant
        run.variant = PosteriorSampling(chain, collector)
        train_seconds = run.fit().train_seconds
        extra["posterior_samples"] = len(collector)
        if options.method == "sgld-dp":
            privacy = chain.summary()
            extra.update({key: privacy[key] for key in ("epsilon", "delta", "noise_multiplier", "max_grad_norm",
                                                        "steps")}, clipped_fraction=chain.clipped_fraction())
        predict = _posterior(run.model, collector)
    else:
        run = build_run(config, data=training_data, run_dir=run_dir)
        train_seconds = run.fit().train_seconds
        run.model.load_state_dict(read_checkpoint(run_dir / "best.pt")["model_state"])
        predict = _single(run.model, config)

    metrics = _evaluate(predict, data, config, run_dir)
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
    if not run_dir.is_dir():
        raise CheckpointError(f"uncertainty run folder {run_dir} does not exist")
    missing = [name for name in ("config.yaml", "uncertainty.json") if not (run_dir / name).is_file()]
    if missing:
        raise CheckpointError(f"{run_dir} is not an uncertainty run: {' and '.join(missing)} missing "
                              f"(`cifarlab uncertainty train` writes both)")
    config = RunConfig.from_dict(read_yaml(run_dir / "config.yaml"), source=str(run_dir / "config.yaml"))
    options = config.uncertainty
    if corruption_images is not None:
        options = dataclasses.replace(options, corruption_images=corruption_images)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, device=device, progress=False),
                                 uncertainty=options)
    torch_device = resolve_device(device)
    data = build_data(config, device=torch_device)
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
        predict = _single(model, config)
    return _evaluate(predict, data, config, run_dir)


def _for_method(config: RunConfig) -> RunConfig:
    """The run's config as the method trains it (a new object; the caller's is unchanged)."""
    if config.uncertainty.method in SAMPLING_METHODS:  # saved as what it is: no momentum, at the SGLD step size
        sgld_lr = config.uncertainty.sgld_lr
        optim = dataclasses.replace(config.optim, lr=config.optim.lr if sgld_lr is None else sgld_lr, momentum=0.0,
                                    nesterov=False)
        return dataclasses.replace(config, optim=optim)
    return config


def _check_model(config: RunConfig) -> None:
    """Refuse, before any work, a model the method cannot use: sgld-dp with layers fitted to the training data
    outside DP-SGD, mc-dropout without dropout."""
    model = create_model(config.model.name, **config.model.args)
    method = config.uncertainty.method
    if method == "sgld-dp" and (hasattr(model, "init_from_data") or unfitted_data_norm(model)):
        raise ConfigError(f"sgld-dp cannot train {config.model.name!r}: it fits layers to statistics of the training "
                          "images, which sgld-dp's privacy guarantee does not cover; use a model without them (cnn, "
                          "wrn with model.args.norm=group, scatter_* without data_norm)")
    if method == "mc-dropout" and not dropout_layers(model):
        raise ConfigError(f"mc-dropout needs a model with dropout; {config.model.name!r} has none with p > 0 "
                          "(use cnn or vgg, or wrn or fast with --model-arg dropout=0.3)")


def _without_test(data: TrainData) -> TrainData:
    """The data as training sees it: the test split is left to the final evaluation."""
    return dataclasses.replace(data, evals={k: v for k, v in data.evals.items() if k != "test"})


def _posterior(model: nn.Module, samples: Any) -> Predict:
    return lambda x: predict_posterior(model, samples, x)


def _single(model: nn.Module, config: RunConfig) -> Predict:
    if config.uncertainty.method == "mc-dropout":
        return lambda x: predict_mc_dropout(model, x, passes=config.uncertainty.passes)
    return _posterior(model, [model.state_dict()])


def _evaluate(predict: Predict, data: TrainData, config: RunConfig, run_dir: Path) -> dict[str, Any]:
    options = config.uncertainty
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
    dataset = load_dataset(config.data.path, name=config.data.dataset, download=config.data.download, progress=False,
                           image_size=config.data.image_size, labels=config.data.labels)
    held_out = held_out_classes(dataset.test, config.data.classes)
    if held_out is None:
        return None
    if config.data.test_subset is not None and config.data.test_subset < len(held_out):
        held_out = held_out.subset(stratified_indices(held_out.labels, config.data.test_subset, seed=config.train.seed))
    return held_out.images.to(device)


COMPARISON_COLUMNS = ("run", "method", "model", "epochs", "acc %", "NLL", "Brier", "ECE %", "ECE floor %", "OOD AUROC",
                      "corr acc %", "corr ECE %", "corr AUROC", "train s", "predict s")


def comparison_rows(run_dirs: list[str | Path]) -> list[dict[str, Any]]:
    """The comparison table from uncertainty run folders (their summary.json): one row per run, and one
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
