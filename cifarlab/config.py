"""Typed run configuration: nested dataclasses, one per concern, validated once at the edge.

A run is described by a `RunConfig`. It is built from a YAML recipe (`cifarlab/recipes/<name>.yaml`) plus command-line
overrides, validated by `RunConfig.from_dict`, saved resolved as `config.yaml` in the run folder and inside every
checkpoint, so `cifarlab train --recipe runs/x/config.yaml` (or `--resume`) rebuilds the same run.
Inside the library, code reads plain values from these objects and never re-validates.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cifarlab.errors import ConfigError
from cifarlab.hardware import PrecisionChoice, choose_precision
from cifarlab.io import read_yaml

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # inside the package: wheels and sdists ship them

OPTIMIZERS = ("sgd", "adam", "adamw", "muon")  # muon: Muon on hidden weights, SGD on the rest
DECAYED = ("all", "weights")  # optim.weight_decay_on: every parameter, or weights only (not norm layers, biases)
SCHEDULES = ("constant", "step", "multistep", "cosine", "onecycle")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")
ACCOUNTANTS = ("rdp", "prv")  # Opacus accountants (cifarlab.privacy.accounting)
DEFAULT_ACCOUNTANT = "prv"  # the tighter of the two; see cifarlab.privacy.accounting
DEFAULT_DELTA = 1e-5
# Data normalisation under DP (cifarlab.privacy.datanorm): T&B's noise multiplier for the statistics' one release,
# and the L2 bound on each example's moments. On GroupNorm-ed ScatterNet features (243 channels of order 1) the
# moment vectors have norms of 21-28 (median 21, max 28 over 500 JPEG-copy training images), so C = 30 leaves them
# unclipped; the noise on each averaged moment is then sigma * C / N = 0.005 for N = 50,000, against channel
# variances of 0.05 and more.
DEFAULT_DATA_NORM_NOISE = 8.0
DEFAULT_DATA_NORM_CLIP = 30.0
PREPROCESSORS = ("normalize", "mean", "zca", "gcn_zca", "none")  # fitted by cifarlab.data.preprocess
PAD_MODES = ("zero", "reflect")  # of cifarlab.data.augment's random crop
LABEL_SETS = ("fine", "coarse")  # data.labels: every dataset's labels, or CIFAR-100's 20 superclasses
MIN_INPUT_SIZE = 8  # the CIFAR networks halve the resolution up to three times
UNCERTAINTY_METHODS = ("none", "mc-dropout", "ensemble", "sgld", "sgld-dp")
SAMPLING_METHODS = ("sgld", "sgld-dp")  # train posterior samples with a training variant of their own
CORRUPTIONS = ("gaussian_noise", "shot_noise", "gaussian_blur", "contrast", "brightness")  # uncertainty.ood's
SEVERITIES = (1, 2, 3, 4, 5)
CONTINUAL_METHODS = ("lda", "qda-shrink", "ncm", "slda")  # cifarlab.continual.classifiers.METHODS
PRIORS = ("uniform", "empirical")  # class priors of the continual classifiers
FEATURE_TRANSFORMS = ("none", "l2", "tukey", "tukey+l2")  # cifarlab.continual.transforms.TRANSFORMS
NOVELTY_SCORES = ("mahalanobis", "relative-mahalanobis", "knn", "msp", "energy")  # cifarlab.continual.novelty
DEFAULT_NOVELTY_SCORES = ("mahalanobis", "relative-mahalanobis", "msp", "energy")  # knn needs continual.knn_bank
RANDOM_PROCESSES = ("dead_leaves", "textured_dead_leaves", "spectral_noise")  # cifarlab.data.synthetic


PENULTIMATE = "penultimate"  # in a layer list: the forward_features output itself


def parse_layers(layer: str | None) -> tuple[str, ...]:
    """The layer names of a `continual.layer` value: None reads the penultimate features, "a,b" concatenates the
    pooled outputs of modules a and b (and "penultimate" the penultimate features) in that order."""
    if layer is None:
        return (PENULTIMATE,)
    names = tuple(name.strip() for name in layer.split(","))
    if not all(names):
        raise ConfigError(f"layer list {layer!r} has an empty name; give module names separated by commas, "
                          f"e.g. blocks.13,{PENULTIMATE}")
    if len(set(names)) != len(names):
        raise ConfigError(f"layer list {layer!r} names a layer twice")
    return names


@dataclass
class DataConfig:
    path: str | None = None  # None: $CIFARLAB_DATA, else the cache dir (downloading when allowed)
    dataset: str = "cifar10"
    labels: str = "fine"  # CIFAR-100: "fine" (100 classes) or "coarse" (20 superclasses); other datasets: "fine"
    download: bool = True
    preprocess: str = "normalize"
    # Side an image folder's images are resized and centre-cropped to when decoded, once, into the uint8 cache.
    # None: they must all have one size. Unlike input_size, it changes the stored images that augmentation sees.
    image_size: int | None = None
    # Side of the square network input; batches are resized on the device after augmentation and normalisation.
    # None: the stored size (32 for CIFAR). Recorded in checkpoints, so evaluation and features resize the same way.
    input_size: int | None = None
    crop_padding: int = 4
    pad_mode: str = "zero"
    translate: int = 0
    flip: bool = True
    # Mirror each image in every other epoch rather than at random (Jordan 2024's derandomized flips); needs flip.
    alternate_flip: bool = False
    cutout: int = 0
    val_size: int = 0  # training images held out (stratified) to pick the best epoch
    train_subset: int | None = None  # stratified subsets for quick runs
    test_subset: int | None = None
    classes: list[int] | None = None  # keep only these class indices (relabelled 0..k-1)

    def validate(self) -> None:
        _choice("data.labels", self.labels, LABEL_SETS)
        if self.labels != "fine" and self.dataset != "cifar100":
            raise ConfigError(f"data.labels {self.labels!r} (--labels {self.labels}) needs data.dataset cifar100 "
                              f"(--dataset cifar100): {self.dataset} has no {self.labels} labels")
        _choice("data.preprocess", self.preprocess, PREPROCESSORS)
        _choice("data.pad_mode", self.pad_mode, PAD_MODES)
        check_input_size("data.input_size", self.input_size)
        check_input_size("data.image_size", self.image_size)
        for name in ("crop_padding", "translate", "cutout", "val_size"):
            _at_least(f"data.{name}", getattr(self, name), 0)
        if self.alternate_flip and not self.flip:
            raise ConfigError("data.alternate_flip (--alternate-flip) needs data.flip (--flip): it changes which "
                              "images are mirrored, not whether")
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) is not None:
                _at_least(f"data.{name}", getattr(self, name), 1)


@dataclass
class ModelConfig:
    name: str = "resnet18_cifar"
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the model's constructor
    # A prior file (`cifarlab prior`, cifarlab.models.prior) whose layers replace the model's initial ones; frozen
    # (not trained, so outside DP-SGD's clipping and noise) or fine-tuned. The file is checked by
    # `RunConfig.check_prior` (the CLI, before the data loads) and when the run is built, not by validate: a trained
    # run's checkpoint must load without the prior file.
    prior: str | None = None
    freeze_prior: bool = True

    def validate(self) -> None:
        from cifarlab.models import list_models

        if ":" not in self.name and self.name not in list_models():
            raise ConfigError(f"unknown model {self.name!r}; valid: {', '.join(list_models())}")


@dataclass
class OptimConfig:
    optimizer: str = "sgd"
    lr: float = 0.1
    muon_lr: float = 0.05  # optimizer muon: the hidden weights' learning rate (lr: the head, norms, biases)
    # optimizer muon: hold each hidden weight at Frobenius norm sqrt(out channels) after every step, for nets whose
    # hidden weights all feed a normalisation layer (their scale is then free; the weight decay is not applied)
    muon_normalize: bool = False
    momentum: float = 0.9
    muon_momentum: float | None = None  # optimizer muon: the hidden weights' momentum (None: momentum)
    nesterov: bool = False
    weight_decay: float = 5e-4
    weight_decay_on: str = "all"  # or "weights": no decay on parameters with < 2 dims (norm layers, biases)
    schedule: str = "cosine"
    step_size: int = 30  # epochs between divisions by 1/gamma ("step")
    gamma: float = 0.1
    milestones: list[int] = field(default_factory=list)  # epochs ("multistep")
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # max global gradient norm

    def validate(self) -> None:
        _choice("optim.optimizer", self.optimizer, OPTIMIZERS)
        _choice("optim.schedule", self.schedule, SCHEDULES)
        _choice("optim.weight_decay_on", self.weight_decay_on, DECAYED)
        _positive("optim.lr", self.lr)
        _positive("optim.muon_lr", self.muon_lr)
        if self.muon_momentum is not None:
            if self.optimizer != "muon":
                raise ConfigError(f"optim.muon_momentum needs optimizer 'muon', got {self.optimizer!r}")
            if not 0 <= self.muon_momentum < 1:
                raise ConfigError(f"optim.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        _at_least("optim.weight_decay", self.weight_decay, 0)
        _at_least("optim.warmup_epochs", self.warmup_epochs, 0)
        _at_least("optim.step_size", self.step_size, 1)
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"optim.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.grad_clip is not None:
            _positive("optim.grad_clip", self.grad_clip)
        if self.muon_normalize and self.optimizer != "muon":
            raise ConfigError(f"optim.muon_normalize needs optimizer 'muon', got {self.optimizer!r}")
        if self.nesterov and (self.optimizer not in ("sgd", "muon") or self.momentum <= 0):
            raise ConfigError("optim.nesterov needs optimizer 'sgd' or 'muon' with momentum > 0")


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    eval_batch_size: int = 1000
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 where the hardware has it natively, else fp32 (cifarlab.hardware)
    channels_last: bool | None = None  # None: on CUDA only
    compile: bool = False  # torch.compile the model (GPU)
    out: str | None = None  # run folder; default runs/<timestamp>-<model>
    progress: bool = True
    tensorboard: bool = False  # also write each epoch's metrics as TensorBoard event files (cifarlab.train.tracking)
    # Evaluate the test set (with the model's TTA) after every k-th epoch and always after the last; 0: after the
    # last only. The val split, which picks best.pt, is evaluated after every epoch. Evaluation draws none of
    # training's random numbers and is not training time: the cadence changes neither weights nor seconds.
    eval_every: int = 1

    def validate(self) -> None:
        _at_least("train.epochs", self.epochs, 1)
        _at_least("train.eval_every", self.eval_every, 0)
        _at_least("train.batch_size", self.batch_size, 1)
        _at_least("train.eval_batch_size", self.eval_batch_size, 1)
        _choice("train.device", self.device, DEVICES)
        _choice("train.precision", self.precision, PRECISIONS)


@dataclass
class DPConfig:
    """DP-SGD (Abadi et al. 2016) through Opacus; see cifarlab.privacy."""

    enabled: bool = False
    target_epsilon: float | None = None  # solve for the noise multiplier ...
    noise_multiplier: float | None = None  # ... or give it and get epsilon reported
    delta: float | None = None  # None: DEFAULT_DELTA (checked against 1/N)
    max_grad_norm: float = 1.0
    accountant: str = DEFAULT_ACCOUNTANT
    poisson: bool = True  # the guarantee assumes Poisson sampling
    augmult: int = 1  # augmented views per example, averaged before clipping (De et al. 2022)
    ema: float | None = None  # parameter EMA decay for evaluation
    physical_batch_size: int | None = None  # micro-batch bound for large logical batches
    # Models with data normalisation: the noise multiplier of its one private release and the L2 bound on each
    # example's moments.
    data_norm_noise: float = DEFAULT_DATA_NORM_NOISE
    data_norm_clip: float = DEFAULT_DATA_NORM_CLIP

    def validate(self) -> None:
        if not self.enabled:
            return
        _choice("dp.accountant", self.accountant, ACCOUNTANTS)
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ConfigError("with --dp give exactly one of --target-epsilon or --noise-multiplier")
        if self.target_epsilon is not None:
            _positive("dp.target_epsilon", self.target_epsilon)
        if self.noise_multiplier is not None:
            _at_least("dp.noise_multiplier", self.noise_multiplier, 0)
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"dp.delta must be in (0, 1), got {self.delta}")
        _positive("dp.max_grad_norm", self.max_grad_norm)
        _at_least("dp.augmult", self.augmult, 1)
        if self.ema is not None and not 0 < self.ema < 1:
            raise ConfigError(f"dp.ema must be in (0, 1), got {self.ema}")
        if self.physical_batch_size is not None:
            _at_least("dp.physical_batch_size", self.physical_batch_size, 1)
        _positive("dp.data_norm_noise", self.data_norm_noise)
        _positive("dp.data_norm_clip", self.data_norm_clip)


@dataclass
class UncertaintyConfig:
    """Predictive uncertainty (`cifarlab uncertainty train`, cifarlab.uncertainty.train); `train` ignores it."""

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

    def validate(self, *, epochs: int) -> None:
        if self.method not in UNCERTAINTY_METHODS:
            raise ConfigError(f"unknown uncertainty method {self.method!r}; valid: {', '.join(UNCERTAINTY_METHODS)}")
        for name in ("members", "passes", "thin"):
            _at_least(f"uncertainty.{name}", getattr(self, name), 1)
        if self.method in SAMPLING_METHODS and not 0 <= self.burn_in_epochs(epochs) < epochs:
            raise ConfigError(f"uncertainty.burn_in ({self.burn_in}) must leave at least one of the {epochs} epochs "
                              "to sample")
        _choice("uncertainty.keep", self.keep, ("disk", "memory"))
        _positive("uncertainty.temperature", self.temperature)
        _positive("uncertainty.noise_multiplier", self.noise_multiplier)
        if self.sgld_lr is not None:
            _positive("uncertainty.sgld_lr", self.sgld_lr)
        for name in self.corruptions:
            _choice("uncertainty.corruptions: corruption", name, CORRUPTIONS)
        for severity in self.severities:
            if severity not in SEVERITIES:
                raise ConfigError(f"uncertainty.severities must be among {SEVERITIES}, got {self.severities}")
        if self.corruption_images is not None:
            _at_least("uncertainty.corruption_images", self.corruption_images, 1)

    def burn_in_epochs(self, epochs: int) -> int:
        return epochs // 2 if self.burn_in is None else self.burn_in


@dataclass
class ContinualConfig:
    """Class-incremental learning (`cifarlab continual`, cifarlab.continual.protocol); `train` ignores it."""

    base_classes: list[int] | None = None  # the backbone's classes (None: `--run` reuses a trained base run)
    order: list[int] | None = None  # the increments' classes in order (None: the rest, ascending)
    group_size: int = 1  # classes per increment
    methods: list[str] = field(default_factory=lambda: list(CONTINUAL_METHODS))
    shrinkage: float | str = 1e-4  # covariance shrinkage in [0, 1] (Deep SLDA's value), or "oas"
    class_shrinkage: float = 0.9  # qda-shrink: weight of the shared covariance in each class's
    prior: str = "uniform"
    # Applied to every feature before fitting, classifying and scoring; saved with the state (continual add uses it)
    feature_transform: str = "none"
    novelty_scores: list[str] = field(default_factory=lambda: list(DEFAULT_NOVELTY_SCORES))  # each one reported
    knn_bank: int = 0  # features kept per class for the knn novelty score (0: none; 1000 x 512 float32: 2 MB a class)
    knn_k: int = 10  # knn: the score is the distance to the k-th nearest kept feature
    # feature layer: a module name, or a comma list of them and "penultimate" (concatenated); None: penultimate
    layer: str | None = None
    finetune_epochs: int = 1  # naive fine-tuning baseline epochs per increment (0: skip it)
    joint: bool = False  # also train the joint upper bound on all classes
    out: str | None = None  # output folder (None: <base run>/continual)

    def validate(self) -> None:
        for method in self.methods:
            _choice("continual.methods: method", method, CONTINUAL_METHODS)
        if not self.methods:
            raise ConfigError(f"continual.methods is empty; valid: {', '.join(CONTINUAL_METHODS)}")
        if self.shrinkage != "oas" and (isinstance(self.shrinkage, str) or not 0 <= self.shrinkage <= 1):
            raise ConfigError(f"continual.shrinkage must be a number in [0, 1] or 'oas', got {self.shrinkage!r}")
        if not 0 <= self.class_shrinkage <= 1:
            raise ConfigError(f"continual.class_shrinkage must be in [0, 1], got {self.class_shrinkage}")
        _choice("continual.prior", self.prior, PRIORS)
        _choice("continual.feature_transform", self.feature_transform, FEATURE_TRANSFORMS)
        for score in self.novelty_scores:
            _choice("continual.novelty_scores: score", score, NOVELTY_SCORES)
        if not self.novelty_scores:
            raise ConfigError(f"continual.novelty_scores is empty; valid: {', '.join(NOVELTY_SCORES)}")
        _at_least("continual.knn_bank", self.knn_bank, 0)
        _at_least("continual.knn_k", self.knn_k, 1)
        if "knn" in self.novelty_scores and not self.knn_bank:
            raise ConfigError("the knn novelty score needs a feature bank: keep up to M features per class with "
                              "continual.knn_bank (--knn-bank M, e.g. 1000), or leave knn out of the scores")
        if self.knn_bank and self.knn_k > self.knn_bank:
            raise ConfigError(f"continual.knn_k ({self.knn_k}) must not exceed continual.knn_bank ({self.knn_bank})")
        _at_least("continual.group_size", self.group_size, 1)
        _at_least("continual.finetune_epochs", self.finetune_epochs, 0)
        if self.layer is not None:
            parse_layers(self.layer)  # names are checked against the model when it is loaded


@dataclass
class PretrainConfig:
    """A prior learned from random processes (`cifarlab prior`, cifarlab.privacy.randp); `train` ignores it."""

    images: int = 20000  # synthetic images drawn once (train.seed seeds them)
    processes: list[str] = field(default_factory=lambda: list(RANDOM_PROCESSES))
    temperature: float = 0.5  # of the contrastive loss (SimCLR's value for CIFAR-10)
    min_crop: float = 0.2  # smallest area fraction of the random resized crops that make the two views

    def validate(self) -> None:
        _at_least("pretrain.images", self.images, 2)
        if not self.processes:
            raise ConfigError(f"pretrain.processes is empty; valid: {', '.join(RANDOM_PROCESSES)}")
        for name in self.processes:
            _choice("pretrain.processes: process", name, RANDOM_PROCESSES)
        _positive("pretrain.temperature", self.temperature)
        if not 0 < self.min_crop <= 1:
            raise ConfigError(f"pretrain.min_crop must be in (0, 1], got {self.min_crop}")


@dataclass
class RunConfig:
    recipe: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    uncertainty: UncertaintyConfig = field(default_factory=UncertaintyConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "RunConfig":
        """Build and validate; unknown keys and wrong types raise ConfigError naming the key and `source`."""
        config = _build(cls, values, prefix="", source=source)
        config.validate()
        return config

    def validate(self) -> None:
        for part in (self.data, self.model, self.optim, self.train, self.dp):
            part.validate()
        self.uncertainty.validate(epochs=self.train.epochs)
        self.continual.validate()
        self.pretrain.validate()
        if self.dp.enabled and self.train.compile:
            raise ConfigError("train.compile cannot be combined with dp: the per-example gradient hooks are not compile-safe")
        if self.optim.schedule == "multistep" and not self.optim.milestones:
            raise ConfigError("optim.schedule 'multistep' needs optim.milestones (epochs)")
        if self.optim.warmup_epochs >= self.train.epochs:
            raise ConfigError(
                f"optim.warmup_epochs ({self.optim.warmup_epochs}) must be below train.epochs ({self.train.epochs})"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def clips_per_example(self) -> bool:
        """Whether training clips per-example gradients: DP-SGD, or SGLD-DP's configuration of it."""
        return self.dp.enabled or self.uncertainty.method == "sgld-dp"

    def precision_on(self, device: torch.device) -> PrecisionChoice:
        """What this run computes in on `device`, and why: its train.precision, and whether it clips per example."""
        return choose_precision(device, self.train.precision, per_example=self.clips_per_example)

    def check_prior(self) -> None:
        """ConfigError, before any work, unless model.prior (if set) is a prior file that fits model.name and was
        pretrained on inputs preprocessed as data.preprocess says."""
        if self.model.prior is None:
            return
        import torch

        from cifarlab.models import create_model
        from cifarlab.models.prior import load_prior

        with torch.random.fork_rng(devices=[]):  # building the model draws initial weights: leave the caller's seed
            model = create_model(self.model.name, **self.model.args)
        load_prior(model, self.model.prior, freeze=self.model.freeze_prior, preprocess=self.data.preprocess)


def list_recipes() -> dict[str, str]:
    """Recipe name -> its one-line description (the YAML's `description` comment line)."""
    recipes = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        recipes[path.stem] = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
    return recipes


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A recipe by name (recipes/<name>.yaml) or by path to any YAML file (e.g. a run's config.yaml)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown recipe {name_or_path!r}; valid: {', '.join(list_recipes())}")
    elif not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist")
    try:
        values = read_yaml(path)
    except Exception as error:  # yaml.YAMLError and decoding errors: say which file
        raise ConfigError(f"recipe {path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections (data, model, optim, train, dp)")
    values.setdefault("recipe", path.stem if path.parent == RECIPES_DIR else str(path))
    return values


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursively overlay `overrides` onto `base` (new dict; neither input is changed)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# --- building dataclasses from plain dicts, with type checks -------------------------------------------------


def _build(cls: type, values: Any, *, prefix: str, source: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{source}: unknown key {prefix}{unknown[0]}; valid: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, prefix=f"{prefix}{name}.", source=source)
        else:
            kwargs[name] = _coerce(value, hint, f"{source}: {prefix}{name}")
    return cls(**kwargs)


_SCALARS: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "true or false"),
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
    str: ((str,), "a string"),
}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a simple type hint (int/float/bool/str, Optional, unions of these, list[int], dict)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        *first, last = [option for option in options if option is not type(None)]
        for option in first:  # the first that accepts the value, e.g. float before str for "1e-4"
            try:
                return _coerce(value, option, where)
            except ConfigError:
                pass
        return _coerce(value, last, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, where) for v in value]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass  # not a number: reported just below
    accepted, description = _SCALARS[hint]
    if not isinstance(value, accepted) or (hint is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {description}, got {value!r}")
    return hint(value)


def check_input_size(name: str, size: int | None) -> None:
    """ConfigError unless `size` is None (no resize) or an integer >= MIN_INPUT_SIZE."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < MIN_INPUT_SIZE):
        raise ConfigError(f"{name} must be an integer >= {MIN_INPUT_SIZE} (pixels per side) or unset, got {size!r}")


def _choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name} {value!r} is not valid; choose one of: {', '.join(valid)}")


def _at_least(name: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")
