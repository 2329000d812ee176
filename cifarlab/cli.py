"""Command line: a thin shell that turns flags into a RunConfig and calls the library.

    cifarlab train --recipe resnet18-adam --data ../shared/datasets/cifar10-jpeg --epochs 5
    cifarlab eval --checkpoint runs/<run>/best.pt --data ...
    cifarlab predict --checkpoint runs/<run>/best.pt cat.png
    cifarlab export --checkpoint runs/<run>/best.pt --format onnx --out model.onnx
    cifarlab prior --out runs/prior --images 20000 --epochs 4
    cifarlab data show | data download | models | recipes | env | compare runs/a runs/b
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from cifarlab import __version__
from cifarlab.config import (ACCOUNTANTS, CONTINUAL_METHODS, DECAYED, DEFAULT_DELTA, DEVICES, FEATURE_TRANSFORMS,
                             LABEL_SETS, NOVELTY_SCORES, OPTIMIZERS, PRECISIONS, PRIORS, RANDOM_PROCESSES, SCHEDULES,
                             UNCERTAINTY_METHODS, ContinualConfig, PretrainConfig, RunConfig, UncertaintyConfig,
                             list_recipes, load_recipe, merge)
from cifarlab.data.augment import PAD_MODES
from cifarlab.data.preprocess import PREPROCESSORS
from cifarlab.errors import CifarlabError, ConfigError
from cifarlab.hardware import THREADS_ENV, thread_count
from cifarlab.train import distributed
from cifarlab.train.host_memory import retain_freed_memory

# (flag, config key, type or choices, help). Every command that trains accepts all of these, spelled the same.
_VALUE_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--data", "data.path", str, "dataset folder/archive (default: $CIFARLAB_DATA, else the download cache)"),
    ("--dataset", "data.dataset", ("cifar10", "cifar100"), "which dataset to look for or download"),
    ("--labels", "data.labels", LABEL_SETS, "CIFAR-100: fine (100 classes, the default) or coarse (20 superclasses)"),
    ("--preprocess", "data.preprocess", PREPROCESSORS, "input preprocessing, fitted on the training split"),
    ("--crop-padding", "data.crop_padding", int, "random crop with this padding (0: off)"),
    ("--pad-mode", "data.pad_mode", PAD_MODES, "padding for the random crop"),
    ("--translate", "data.translate", int, "random translation by up to this many pixels"),
    ("--cutout", "data.cutout", int, "cutout square size (0: off)"),
    ("--val-size", "data.val_size", int, "training images held out to select the best epoch"),
    ("--train-subset", "data.train_subset", int, "use a stratified subset of N training images"),
    ("--test-subset", "data.test_subset", int, "use a stratified subset of N test images"),
    ("--classes", "data.classes", "int_list", "keep only these class indices, e.g. 0-4 or 0,3,5"),
    ("--image-size", "data.image_size", int, "image folders: resize (shorter side, then centre crop) every image to "
     "N x N once, when decoded into the cache; needed when the images differ in size"),
    ("--input-size", "data.input_size", int, "resize the network input to N x N on the device, batch by batch after "
     "augmentation (training, evaluation, features); the cached images keep their size"),
    ("--model", "model.name", str, "model name (see `cifarlab models`)"),
    ("--model-prior", "model.prior", str, "start the model's features from this prior file (`cifarlab prior`)"),
    ("--optimizer", "optim.optimizer", OPTIMIZERS, "optimizer"),
    ("--lr", "optim.lr", float, "base learning rate"),
    ("--muon-lr", "optim.muon_lr", float, "optimizer muon: learning rate of the hidden weights (--lr: head, norms, "
     "biases)"),
    ("--momentum", "optim.momentum", float, "SGD momentum"),
    ("--muon-momentum", "optim.muon_momentum", float, "optimizer muon: momentum of the hidden weights (default: "
     "--momentum)"),
    ("--weight-decay", "optim.weight_decay", float, "weight decay (L2)"),
    ("--weight-decay-on", "optim.weight_decay_on", DECAYED, "all parameters, or weights only (not norm layers, biases)"),
    ("--schedule", "optim.schedule", SCHEDULES, "learning-rate schedule"),
    ("--step-size", "optim.step_size", int, "epochs between lr drops (schedule step)"),
    ("--gamma", "optim.gamma", float, "lr drop factor (step, multistep)"),
    ("--milestones", "optim.milestones", "int_list", "epochs of lr drops (multistep), e.g. 100,200"),
    ("--warmup-epochs", "optim.warmup_epochs", float, "linear warmup length in epochs"),
    ("--label-smoothing", "optim.label_smoothing", float, "label smoothing"),
    ("--grad-clip", "optim.grad_clip", float, "clip the global gradient norm"),
    ("--epochs", "train.epochs", int, "training epochs"),
    ("--batch-size", "train.batch_size", int, "training batch size"),
    ("--eval-batch-size", "train.eval_batch_size", int, "evaluation batch size"),
    ("--eval-every", "train.eval_every", int, "evaluate the test set after every K-th epoch and the last (0: the last "
     "only; bench: 1 unless given); a val split is evaluated every epoch"),
    ("--seed", "train.seed", int, "random seed (same seed, same numbers on CPU)"),
    ("--device", "train.device", DEVICES, "where to train"),
    ("--precision", "train.precision", PRECISIONS, "auto: bf16 where the hardware runs it natively (see `cifarlab env`)"),
    ("--out", "train.out", str, "run folder (default runs/<timestamp>-<model>)"),
    ("--target-epsilon", "dp.target_epsilon", float, "DP: solve the noise multiplier for this epsilon"),
    ("--noise-multiplier", "dp.noise_multiplier", float, "DP: noise multiplier sigma (epsilon is reported)"),
    ("--delta", "dp.delta", float, f"DP: delta (default {DEFAULT_DELTA}, must be < 1/N)"),
    ("--max-grad-norm", "dp.max_grad_norm", float, "DP: per-sample clipping norm C"),
    ("--accountant", "dp.accountant", ACCOUNTANTS, "DP: privacy accountant"),
    ("--augmult", "dp.augmult", int, "DP: augmented views per example (De et al. 2022)"),
    ("--ema", "dp.ema", float, "DP: parameter EMA decay used for evaluation"),
    ("--physical-batch-size", "dp.physical_batch_size", int, "DP: micro-batch size bound"),
    ("--data-norm-noise", "dp.data_norm_noise", float, "DP: noise multiplier of the data-normalisation release"),
]
_SWITCH_FLAGS: list[tuple[str, str, str]] = [
    ("--flip", "data.flip", "random horizontal flips"),
    ("--alternate-flip", "data.alternate_flip", "mirror each training image in every other epoch instead of at random "
     "(needs --flip)"),
    ("--download", "data.download", "download the dataset when no local copy is found"),
    ("--nesterov", "optim.nesterov", "Nesterov momentum"),
    ("--muon-normalize", "optim.muon_normalize", "optimizer muon: hold each hidden weight at norm sqrt(out channels) "
     "(nets with a normalisation layer after every hidden weight)"),
    ("--channels-last", "train.channels_last", "channels_last memory format (default: on CUDA)"),
    ("--compile", "train.compile", "torch.compile the model"),
    ("--progress", "train.progress", "show a progress bar"),
    ("--dp", "dp.enabled", "train with DP-SGD (see --target-epsilon, --noise-multiplier)"),
    ("--poisson", "dp.poisson", "DP: Poisson sampling (the guarantee assumes it)"),
    ("--freeze-prior", "model.freeze_prior", "keep the layers loaded from --model-prior frozen (default), or "
     "fine-tune them (--no-freeze-prior)"),
    ("--tensorboard", "train.tensorboard", "write each epoch's metrics as TensorBoard event files in the run folder"),
]


@dataclass(frozen=True)
class _Repeated:
    """A flag given once per value (e.g. --method lda --method ncm), each one of `choices`."""

    choices: tuple[str, ...]


# The sections only one command reads, flags as in _VALUE_FLAGS / _SWITCH_FLAGS (a flag may have several spellings).
_SECTION_FLAGS: dict[str, list[tuple[str | tuple[str, ...], str, Any, str]]] = {
    "uncertainty": [
        ("--method", "uncertainty.method", UNCERTAINTY_METHODS, f"method (default {UncertaintyConfig.method})"),
        ("--members", "uncertainty.members", int, f"ensemble size (default {UncertaintyConfig.members}; sine: its own)"),
        ("--passes", "uncertainty.passes", int,
         f"MC dropout test-time passes (default {UncertaintyConfig.passes}; sine: its own)"),
        ("--temperature", "uncertainty.temperature", float,
         f"SGLD posterior temperature (default {UncertaintyConfig.temperature:g})"),
        ("--sgld-lr", "uncertainty.sgld_lr", float, "SGLD step size (default: --lr)"),
        ("--burn-in", "uncertainty.burn_in", int, "SGLD epochs before the first sample (default: half)"),
        ("--thin", "uncertainty.thin", int, f"SGLD epochs between samples (default {UncertaintyConfig.thin})"),
        ("--keep", "uncertainty.keep", ("disk", "memory"), "SGLD samples as checkpoints or in memory"),
        ("--corruption-images", "uncertainty.corruption_images", int,
         f"test images per corruption set (default {UncertaintyConfig.corruption_images})"),
    ],
    "continual": [
        ("--base-classes", "continual.base_classes", "int_list", "classes the backbone is trained on, e.g. 0-4"),
        (("--increments", "--order"), "continual.order", "int_list",
         "order of the new classes, e.g. 5,6,7,8,9 (default: the rest, ascending)"),
        ("--group-size", "continual.group_size", int, f"classes added per step (default {ContinualConfig.group_size})"),
        ("--method", "continual.methods", _Repeated(CONTINUAL_METHODS),
         "classifier(s) to compare (repeatable; default all)"),
        ("--shrinkage", "continual.shrinkage", str,
         f"covariance shrinkage in [0, 1], or oas (default {ContinualConfig.shrinkage:g})"),
        ("--class-shrinkage", "continual.class_shrinkage", float,
         f"qda-shrink: weight of the shared covariance (default {ContinualConfig.class_shrinkage})"),
        ("--prior", "continual.prior", PRIORS, f"class prior (default {ContinualConfig.prior})"),
        ("--feature-transform", "continual.feature_transform", FEATURE_TRANSFORMS,
         "transform of every feature before fitting, classifying and scoring: l2 (unit norm), tukey (x^0.5), "
         f"tukey+l2; saved with the state (default {ContinualConfig.feature_transform})"),
        ("--novelty-score", "continual.novelty_scores", "name_list",
         f"novelty scores to report, comma-separated or all: {', '.join(NOVELTY_SCORES)} (default "
         f"{','.join(ContinualConfig().novelty_scores)}; knn needs --knn-bank)"),
        ("--knn-bank", "continual.knn_bank", int,
         f"features kept per class for the knn score (default {ContinualConfig.knn_bank}: none)"),
        ("--knn-k", "continual.knn_k", int,
         f"knn: distance to the k-th nearest kept feature (default {ContinualConfig.knn_k})"),
        ("--layer", "continual.layer", str, "feature layer(s): a module name, or a comma list of module names and "
         "'penultimate' whose pooled outputs are concatenated, e.g. blocks.13,penultimate (default: penultimate)"),
        ("--finetune-epochs", "continual.finetune_epochs", int,
         f"naive fine-tuning baseline epochs (0: skip; default {ContinualConfig.finetune_epochs})"),
        ("--continual-out", "continual.out", str, "output folder (default <base run>/continual)"),
    ],
    "pretrain": [
        ("--images", "pretrain.images", int, f"synthetic images drawn once (default {PretrainConfig.images})"),
        ("--process", "pretrain.processes", _Repeated(RANDOM_PROCESSES),
         "random process to draw from (repeatable; default all)"),
        ("--temperature", "pretrain.temperature", float,
         f"temperature of the contrastive loss (default {PretrainConfig.temperature})"),
        ("--min-crop", "pretrain.min_crop", float,
         f"smallest area fraction of the views' random crops (default {PretrainConfig.min_crop})"),
    ],
}
_SECTION_SWITCHES: dict[str, list[tuple[str, str, str]]] = {
    "continual": [("--joint", "continual.joint", "also train the joint upper bound on all classes")],
}


def add_training_flags(parser: argparse.ArgumentParser, *, section: str | None = None) -> None:
    """The flags of every config field, plus those of the command's own `section` (uncertainty, continual)."""
    parser.add_argument("--recipe", help="recipe name (see `cifarlab recipes`) or a YAML file, e.g. a run's config.yaml")
    parser.add_argument("--resume", help="continue a killed run from its folder (or its last.pt)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="model constructor argument")
    for flag, key, kind, help_text in _VALUE_FLAGS + _SECTION_FLAGS.get(section, []):
        flags = (flag,) if isinstance(flag, str) else flag
        if isinstance(kind, _Repeated):
            parser.add_argument(*flags, dest=key, action="append", choices=kind.choices, help=help_text)
        elif isinstance(kind, tuple):
            parser.add_argument(*flags, dest=key, choices=kind, help=help_text)
        else:
            metavar = flags[0].lstrip("-").upper().replace("-", "_")
            parsers = {"int_list": _int_list, "name_list": _name_list}
            parser.add_argument(*flags, dest=key, type=parsers.get(kind, kind), metavar=metavar, help=help_text)
    for flag, key, help_text in _SWITCH_FLAGS + _SECTION_SWITCHES.get(section, []):
        parser.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, help=help_text)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Recipe (or defaults) overlaid with the flags the user gave, validated once."""
    base = load_recipe(args.recipe) if args.recipe else {}
    overrides = _flag_overrides(args)
    config = RunConfig.from_dict(merge(base, overrides), source=args.recipe or "flags")
    # muon_lr has a default, so the config cannot tell a flag that the optimizer ignores from no flag
    if "muon_lr" in overrides.get("optim", {}) and config.optim.optimizer != "muon":
        raise ConfigError(f"--muon-lr applies to optimizer muon only; this run's optimizer is "
                          f"{config.optim.optimizer!r} (add --optimizer muon, or drop --muon-lr)")
    if config.train.tensorboard:  # an optional dependency: missing, say so before the data loads
        from cifarlab.train.tracking import require_tensorboard

        require_tensorboard()
    config.check_prior()
    return config


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Only the flags given on the command line, as nested {section: {field: value}}."""
    overrides: dict[str, Any] = {}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".")
            overrides.setdefault(section, {})[name] = value
    for item in args.model_arg:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--model-arg expects KEY=VALUE, got {item!r}")
        overrides.setdefault("model", {}).setdefault("args", {})[name] = yaml.safe_load(value)
    return overrides


def _name_list(text: str) -> list[str]:
    """'a,b' -> ['a', 'b']; 'all' -> every novelty score. The names are checked with the config, which lists the
    valid ones."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    return list(NOVELTY_SCORES) if names == ["all"] else names


def _int_list(text: str) -> list[int]:
    """'0-4' -> [0..4]; '5,6,9' -> [5, 6, 9]; mixed '0-2,7' works too."""
    values: list[int] = []
    try:
        for part in text.split(","):
            low, sep, high = part.partition("-")
            if sep and int(high) < int(low):
                raise argparse.ArgumentTypeError(f"the range {part!r} in {text!r} runs backwards; write {high}-{low}")
            values.extend(range(int(low), int(high) + 1) if sep else [int(low)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0-4 or 5,6,9, got {text!r}") from None
    return values


# --- commands ----------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> None:
    from cifarlab.train.checkpoint import read_checkpoint
    from cifarlab.train.run import run_training
    from cifarlab.report.run_report import format_table

    if args.resume:
        # A resumed run is the saved run: only how long and where it runs may change.
        resume = Path(args.resume)
        saved = read_checkpoint(resume / "last.pt" if resume.is_dir() else resume)["config"]
        overrides = _flag_overrides(args)
        changed = {f"{section}.{name}" for section, values in overrides.items() for name in values}
        not_allowed = sorted(changed - {"train.epochs", "train.device", "train.progress", "train.eval_every"})
        if not_allowed or args.recipe:
            raise ConfigError(
                "--resume continues the saved config; only --epochs, --device, --progress, --eval-every may change "
                f"(got {', '.join(not_allowed) or '--recipe'})"
            )
        config = RunConfig.from_dict(merge(saved, overrides), source=str(resume))
    else:
        config = config_from_args(args)
    try:
        result = run_training(config, resume=args.resume)
    finally:
        distributed.cleanup()
    if result.run_dir is None:  # a torchrun worker other than rank 0, which prints
        return
    s = result.summary
    print(f"\nrun folder: {result.run_dir}")
    row = {
        "model": s["model"],
        "epochs": s["epochs"],
        "best epoch": s["best_epoch"],
        "val acc": _pct(s["val_accuracy"]),
        "test acc": _pct(s["test_accuracy"]),
        "train time": f"{s['train_seconds']:.0f} s",
        "images/s": f"{s['images_per_second']:.0f}",
        "device": s["device"],
        "precision": s["precision"],
    }
    print(format_table([row], list(row)))


def cmd_eval(args: argparse.Namespace) -> None:
    from cifarlab.train.inference import evaluate_checkpoint
    from cifarlab.report.run_report import format_table

    report = evaluate_checkpoint(
        args.checkpoint, data=args.data, test_subset=args.test_subset, device=args.device, out=args.out
    )
    rows = [{"class": c, "accuracy": _pct(a)} for c, a in report["per_class_accuracy"].items()]
    print(format_table(rows, ["class", "accuracy"]))
    print(f"test accuracy {_pct(report['test_accuracy'])}  loss {report['test_loss']:.4f}  ({report['test_images']} images)")


def cmd_predict(args: argparse.Namespace) -> None:
    from cifarlab.io import write_csv
    from cifarlab.train.inference import predict_files

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    rows = []
    for path, probabilities in predict_files(args.checkpoint, args.images, device=args.device,
                                             batch_size=args.batch_size, progress=args.csv is not None):
        ranked = sorted(probabilities.items(), key=lambda kv: -kv[1])
        if args.csv is None:
            top = ", ".join(f"{name} {p:.1%}" for name, p in ranked[: args.top])
            print(f"{path}: {ranked[0][0]}  ({top})")
        rows.append({"path": path, "class": ranked[0][0], **{f"p_{name}": p for name, p in probabilities.items()}})
    if args.csv is not None:  # written once all images are read: a bad image leaves no partial file
        columns = ["path", "class", *(key for key in rows[0] if key.startswith("p_"))]
        print(f"wrote {len(rows)} predictions to {write_csv(args.csv, rows, columns)}")


def cmd_export(args: argparse.Namespace) -> None:
    from cifarlab.export import export_checkpoint

    print(f"wrote {export_checkpoint(args.checkpoint, format=args.format, out=args.out)}")


def cmd_data_show(args: argparse.Namespace) -> None:
    from cifarlab.report.samples import show_augmented

    config = config_from_args(args)
    path = show_augmented(config, count=args.count, out=Path(args.png))
    print(f"wrote {path}")


def cmd_data_download(args: argparse.Namespace) -> None:
    from cifarlab.data.download import download_dataset

    print(f"dataset ready at {download_dataset(args.name, cache_dir=args.cache_dir, url=args.url, md5=args.md5)}")


def cmd_models(args: argparse.Namespace) -> None:
    from cifarlab.models import describe_model, list_models

    for name in list_models():
        print(f"{name:18s} {describe_model(name)}")
    print("torchvision:<name>, timm:<name>  any model of that package, when it is installed")


def cmd_bench(args: argparse.Namespace) -> None:
    from cifarlab.train.bench import append_csv, format_rows, time_to_accuracy

    if args.__dict__["train.eval_every"] is None:  # thresholds need every epoch's accuracy, whatever the recipe says
        args.__dict__["train.eval_every"] = 1
    config = config_from_args(args)
    seeds = [config.train.seed + i for i in range(args.seeds)]

    def report(seed: int, run: dict) -> None:
        best = max(accuracy for accuracy in run["test_acc"] if accuracy is not None)  # None: not evaluated
        print(f"seed {seed}: final test accuracy {run['test_acc'][-1]:.2%} after {len(run['test_acc'])} epochs, "
              f"{sum(run['epoch_seconds']):.0f} s of training, best {best:.2%}", flush=True)

    rows = time_to_accuracy(config, thresholds=args.thresholds, seeds=seeds, eval_from=args.eval_from, on_run=report)
    print(format_rows(rows))
    print(f"appended to {append_csv(args.csv, rows)}")


def _float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.85,0.90, got {text!r}") from None


def cmd_recipes(args: argparse.Namespace) -> None:
    for name, description in list_recipes().items():
        print(f"{name:22s} {description}")


def cmd_env(args: argparse.Namespace) -> None:
    from cifarlab.environment import gather_environment

    print(gather_environment(threads=args.threads, data=args.data).format())


def cmd_compare(args: argparse.Namespace) -> None:
    from cifarlab.report.run_report import compare_runs

    print(compare_runs(args.runs, out=args.out))


def cmd_continual(args: argparse.Namespace) -> None:
    if args.action == "add":
        # Only what adding a class needs: the protocol's imports (matplotlib, the trainer) cost start-up time.
        from cifarlab.continual.state import add_class_from_folder

        missing = [flag for flag, value in (("--state", args.state), ("--class-name", args.class_name),
                                            ("--images", args.images)) if not value]  # fmt: skip
        if missing:
            raise ConfigError(f"cifarlab continual add needs {', '.join(missing)}")
        state = add_class_from_folder(args.state, args.class_name, args.images, checkpoint=args.checkpoint,
                                      device=args.__dict__["train.device"] or "auto")  # fmt: skip
        print(f"{args.state}: learned {args.class_name!r}; classes now {', '.join(state.classes)}")
        return
    from cifarlab.continual.protocol import protocol_options, run_continual, run_protocol, summary_table

    config = config_from_args(args)
    # With --run the backbone computes in the base run's precision unless --precision says otherwise.
    options = protocol_options(config, precision=args.__dict__["train.precision"] if args.run else None)
    if args.run:
        summary = run_protocol(args.run, options)
    else:
        if not config.continual.base_classes:
            raise ConfigError("cifarlab continual needs --base-classes (to train a backbone) or --run (to reuse one)")
        summary = run_continual(config, config.continual.base_classes, options)
    print(summary_table(summary))


def cmd_uncertainty(args: argparse.Namespace) -> None:
    from cifarlab.report.run_report import format_table
    from cifarlab.uncertainty import train as uncertainty

    if args.action == "sine":
        from cifarlab.uncertainty.sine import SineConfig, run_sine

        flag = args.__dict__
        fields = {"method": flag["uncertainty.method"], "epochs": flag["train.epochs"], "seed": flag["train.seed"],
                  "chains": args.chains, "members": flag["uncertainty.members"], "passes": flag["uncertainty.passes"]}
        config = SineConfig(**{k: v for k, v in fields.items() if v is not None})
        out = args.__dict__["train.out"] or f"runs/sine-{config.method}"
        summary = run_sine(config, out=out)
        print(f"{out}: std in data {summary['std_in_data']:.4f}, in the gap {summary['std_in_gap']:.4f} "
              f"(ratio {summary['std_in_gap'] / max(summary['std_in_data'], 1e-12):.2f}); plot {out}/sine.png")
        return
    if args.action == "eval":
        if not args.run:
            raise ConfigError("cifarlab uncertainty eval needs --run RUN_DIR")
        uncertainty.evaluate_run(args.run, device=args.__dict__["train.device"] or "auto")
        runs = [args.run]
    elif args.action == "compare":
        runs = args.runs
    else:
        distributed.require_single_process("cifarlab uncertainty train")
        if args.__dict__["dp.noise_multiplier"] is not None:  # sgld-dp's sigma, spelled as DP-SGD's
            args.__dict__["uncertainty.noise_multiplier"] = args.__dict__["dp.noise_multiplier"]
        summary = uncertainty.train_uncertainty(config_from_args(args))
        runs = [summary["run_dir"]]
    print(format_table(uncertainty.comparison_rows(runs), list(uncertainty.COMPARISON_COLUMNS)))


PRIOR_RECIPE = "randp-prior-cpu"  # what `cifarlab prior` builds without --recipe
PRIOR_OUT = "runs/prior"  # where it writes without --out: the folder the randp recipes read model.prior from


def cmd_prior(args: argparse.Namespace) -> None:
    from cifarlab.privacy.randp import build_prior

    if args.resume:
        raise ConfigError("cifarlab prior does not resume; build the prior again into another --out")
    distributed.require_single_process("cifarlab prior")
    flag_of = {key: flag if isinstance(flag, str) else flag[0] for flag, key, *_ in _VALUE_FLAGS + _SWITCH_FLAGS}
    ignored = ("model.prior", "model.freeze_prior")
    unused = [flag_of[key] for key, value in vars(args).items()
              if value is not None and (key.split(".")[0] in ("data", "dp") or key in ignored)]
    if unused:  # the prior draws its own images and learns without labels or privacy: these would be ignored
        raise ConfigError(f"cifarlab prior does not take {', '.join(unused)}: it draws its own synthetic images "
                          "(--images, --process) and spends no privacy")
    args.recipe = args.recipe or PRIOR_RECIPE
    args.__dict__["train.out"] = args.__dict__["train.out"] or PRIOR_OUT
    summary = build_prior(config_from_args(args))
    out = args.__dict__["train.out"]
    print(f"{out}/prior.pt: {summary['model']} features from {summary['images']} synthetic images, "
          f"{summary['epochs']} epochs; contrastive loss {summary['final_loss']:.3f}, pair accuracy "
          f"{summary['final_pair_accuracy']:.1%}; {summary['generate_seconds']:.0f} s generating, "
          f"{summary['train_seconds']:.0f} s training")


def cmd_privacy_audit(args: argparse.Namespace) -> None:
    from cifarlab.privacy.audit import audit_checkpoint

    result = audit_checkpoint(args.checkpoint, data_path=args.data, count=args.count, seed=args.seed, device=args.device)
    for key, value in result.items():
        print(f"{key:24s} {value:.4f}" if isinstance(value, float) else f"{key:24s} {value}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifarlab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    parser.add_argument("--version", action="version", version=f"cifarlab {__version__}")

    def command(name: str, handler: Callable, help_text: str, parent=commands) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        if handler is not None:
            sub.add_argument("--threads", metavar="N", help=f"torch intra-op threads (default: ${THREADS_ENV}, else "
                                                            "the cores this process may use)")
        return sub

    add_training_flags(command("train", cmd_train, "train a model; writes a run folder"))

    sub = command("eval", cmd_eval, "evaluate a checkpoint on a test set")
    sub.add_argument("--checkpoint", required=True, help="a best.pt/last.pt or a run folder")
    sub.add_argument("--data", help="dataset (default: the one the checkpoint was trained on)")
    sub.add_argument("--test-subset", type=int, help="stratified subset of N test images")
    sub.add_argument("--device", choices=DEVICES, default="auto")
    sub.add_argument("--out", help="write the evaluation as JSON here")

    sub = command("predict", cmd_predict, "classify image files and folders with a checkpoint")
    sub.add_argument("--checkpoint", required=True, help="a best.pt/last.pt or a run folder")
    sub.add_argument("images", nargs="+", help="image files Pillow reads, or folders searched recursively for them "
                                               "(resized as the checkpoint's training images)")
    sub.add_argument("--top", type=int, default=3, help="how many classes to print")
    sub.add_argument("--csv", metavar="FILE", help="write path, class and p_<class> (each class's probability) "
                                                  "per image to this CSV instead of printing; shows a progress bar")
    sub.add_argument("--batch-size", type=int, default=256, help="images classified at once")
    sub.add_argument("--device", choices=DEVICES, default="auto")

    sub = command("export", cmd_export, "a checkpoint as ONNX or TorchScript: uint8 images (N, H, W, 3) in, class "
                                        "probabilities out, preprocessing inside, class names attached")
    sub.add_argument("--checkpoint", required=True, help="a best.pt/last.pt or a run folder")
    sub.add_argument("--format", required=True, choices=("onnx", "torchscript"),
                     help="onnx needs pip install \"cifarlab[export]\"")
    sub.add_argument("--out", required=True, help="the file to write (e.g. model.onnx, model.pt)")

    data = command("data", None, "dataset tools").add_subparsers(dest="data_command", required=True, metavar="ACTION")
    sub = command("show", cmd_data_show, "PNG grid of augmented training samples", parent=data)
    add_training_flags(sub)
    sub.add_argument("--count", type=int, default=32, help="how many images")
    sub.add_argument("--png", default="samples.png", help="output PNG")
    sub = command("download", cmd_data_download, "download a dataset to the cache (MD5 verified)", parent=data)
    sub.add_argument("name", nargs="?", default="cifar10", choices=("cifar10", "cifar100", "cifar10-binary"))
    sub.add_argument("--cache-dir", help="default: $CIFARLAB_CACHE or ~/.cache/cifarlab")
    sub.add_argument("--url", help="mirror URL of the same archive")
    sub.add_argument("--md5", help="MD5 of the mirror's archive (default: the official one)")

    sub = command("continual", cmd_continual, "class-incremental learning with Gaussian feature classifiers")
    sub.add_argument("action", nargs="?", choices=("run", "add"), default="run",
                     help="run: the protocol (default); add: learn one class into a saved state")  # fmt: skip
    add_training_flags(sub, section="continual")
    sub.add_argument("--run", help="reuse a trained base run (folder or checkpoint) instead of training one")
    sub.add_argument("--state", help="add: the saved classifier state (state.pt)")
    sub.add_argument("--class-name", help="add: name of the new class")
    sub.add_argument("--images", help="add: folder of the new class's images")
    sub.add_argument("--checkpoint", help="add: backbone checkpoint (default: the one recorded in the state)")

    privacy = command("privacy", None, "privacy tools").add_subparsers(dest="privacy_command", required=True, metavar="ACTION")
    sub = command("audit", cmd_privacy_audit, "loss-threshold membership inference: attack AUC on a checkpoint",
                  parent=privacy)  # fmt: skip
    sub.add_argument("--checkpoint", required=True, help="a best.pt/last.pt or a run folder")
    sub.add_argument("--data", help="dataset (default: the one the checkpoint was trained on)")
    sub.add_argument("--count", type=int, default=5000, help="members and non-members each")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--device", choices=DEVICES, default="auto")

    sub = command("prior", cmd_prior, "learn a model's features from images of random processes (no real data, no "
                                      "privacy spent), for runs with --model-prior; writes a run folder with prior.pt")
    add_training_flags(sub, section="pretrain")

    sub = command("uncertainty", cmd_uncertainty, "predictive uncertainty: SGLD, MC dropout, ensembles")
    sub.add_argument("action", choices=("sine", "train", "eval", "compare"),
                     help="sine: the 1-D regression demo; train: a CIFAR run; eval: re-evaluate --run; compare RUN...")
    sub.add_argument("runs", nargs="*", help="compare: uncertainty run folders")
    add_training_flags(sub, section="uncertainty")
    sub.add_argument("--run", help="eval: the run folder")
    sub.add_argument("--chains", type=int, help="sine: SGLD chains pooled")

    command("models", cmd_models, "list the registered models")
    sub = command("bench", cmd_bench, "time-to-accuracy of a recipe over seeds: a table, rows appended to a CSV")
    add_training_flags(sub)
    sub.add_argument("--seeds", type=int, default=3, help="train with seeds seed, seed+1, ... (default %(default)s runs)")
    sub.add_argument("--thresholds", type=_float_list, default=[0.85, 0.90], help="test accuracies, e.g. 0.85,0.90")
    sub.add_argument("--csv", default="bench.csv", help="CSV the rows are appended to")
    sub.add_argument("--eval-from", type=int, default=1,
                     help="evaluate the test set from this epoch on (saves wall time; times become upper bounds)")

    command("recipes", cmd_recipes, "list the recipes")
    sub = command("env", cmd_env, "versions, devices, precision and threads, data cache and datasets: for bug reports")
    sub.add_argument("--data", help="also look for datasets in this folder or archive")
    sub = command("compare", cmd_compare, "compare run folders: one table + overlaid curves PNG")
    sub.add_argument("runs", nargs="+", help="run folders")
    sub.add_argument("--out", default=".", help="folder for compare.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        torch.set_num_threads(thread_count(args.threads))
        retain_freed_memory()  # a CLI process owns its heap: keep freed pages for the next step (train/host_memory)
        args.handler(args)
    except CifarlabError as error:
        print(f"cifarlab: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the machine's doing (a full disk, a folder that cannot be made), not a bug to trace
        print(f"cifarlab: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cifarlab: interrupted; the run folder keeps its last completed epoch (use --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
