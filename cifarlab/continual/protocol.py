"""The class-incremental protocol of Lee et al. (NeurIPS 2018): a backbone trained on base classes
only, then frozen; new classes arrive in groups with only their own training images; after every
step every method is scored on the whole test set.

    run = train_base(config, base_classes=[0, 1, 2, 3, 4])        # the one engine, 5-way head
    summary = run_protocol(run, ProtocolOptions(order=(5, 6, 7, 8, 9)))

Methods are the Gaussian classifiers of `classifiers.METHODS` plus three baselines:
`linear-head` (the backbone's own head: base classes only), `finetune` (naive fine-tuning of the
whole network + a widened head on each new group alone: catastrophic forgetting, the lower bound)
and `joint` (training on all learned classes at once: the upper bound, one full training).
Every method's novelty detection (test images of classes not learned yet = positives) is scored
after every step by the scores of `novelty.NOVELTY_SCORES` that apply to it (AUROC and FPR at 95%
TPR): the Gaussian methods by the classifier and feature-bank scores, the heads by msp and energy;
each method's default score (mahalanobis, msp) always, as `novelty_auroc_per_step`.
Writes to the output folder: summary.json, accuracy_per_step.png, novelty_per_step.png,
confusion_<method>.png (after the last step) and state.pt (the final classifier state, for
`add_class_from_folder`).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from cifarlab.config import PRECISIONS, RunConfig, merge
from cifarlab.continual.classifiers import METHODS, MethodOptions, fit
from cifarlab.continual.features import FEATURE_BATCH_SIZE, check_layers, describe_backbone, extract_features
from cifarlab.continual.metrics import auroc, average_incremental_accuracy, forgetting, fpr95, seen_accuracy
from cifarlab.continual.novelty import (DEFAULT_KNN_K, DEFAULT_NOVELTY_SCORES, GAUSSIAN_DEFAULT, HEAD_DEFAULT,
                                        bank_scores, check_novelty_scores, classifier_scores, head_scores)
from cifarlab.continual.plots import plot_accuracy_per_step, plot_novelty_per_step
from cifarlab.continual.state import ContinualState, save_state
from cifarlab.continual.transforms import check_transform
from cifarlab.data.loader import BatchLoader, TrainData, relabelling
from cifarlab.data.preprocess import Preprocessor
from cifarlab.data.sources import Dataset, Split, load_dataset
from cifarlab.errors import ConfigError, DataError
from cifarlab.io import check_writable_folder, write_json
from cifarlab.metrics import accuracy, confusion_matrix, per_class_accuracy
from cifarlab.models.registry import create_model
from cifarlab.report.plots import plot_confusion
from cifarlab.report.run_report import format_table
from cifarlab.train.checkpoint import LoadedModel, load_model
from cifarlab import hardware
from cifarlab.train import engine
from cifarlab.train.run import run_training

BASELINES = ("linear-head", "finetune", "joint")


@dataclass(frozen=True)
class ProtocolOptions:
    """How the increments arrive and what is measured.

    order: dataset class indices of the increments (default: the classes not in the base, in
    index order); group_size: classes per increment; layer: where features are read (see
    features.extract_features; inputs are resized to the base run's own data.input_size, as in its
    training); finetune_epochs: epochs per increment of the `finetune` baseline (0: skip);
    joint: also train the `joint` upper bound; data: dataset path (default: the base run's);
    precision: "fp32", "bf16" or "auto" for the backbone's forward passes (default: the base run's
    train.precision, resolved for the device as in training); the state records it, so that
    `continual add` computes its features alike; feature_transform: applied to every feature before the
    statistics, classification and scores (see continual.transforms; saved with the state); novelty_scores:
    the novelty scores to report (see continual.novelty; `knn` needs knn_bank > 0, the features kept per class,
    and reads the knn_k-th nearest).
    """

    order: tuple[int, ...] | None = None
    group_size: int = 1
    methods: tuple[str, ...] = tuple(METHODS)
    method_options: MethodOptions = field(default_factory=MethodOptions)
    layer: str | None = None
    finetune_epochs: int = 1
    joint: bool = False
    data: str | None = None
    device: str = "auto"
    precision: str | None = None
    batch_size: int = FEATURE_BATCH_SIZE
    out: str | None = None  # default: <base run>/continual
    progress: bool = True
    feature_transform: str = "none"
    novelty_scores: tuple[str, ...] = DEFAULT_NOVELTY_SCORES
    knn_bank: int = 0
    knn_k: int = DEFAULT_KNN_K

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"unknown continual method(s) {unknown or '(none given)'}; valid: {', '.join(METHODS)}")
        if self.precision not in (None, *PRECISIONS):
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name, low in (("group_size", 1), ("finetune_epochs", 0), ("batch_size", 1), ("knn_bank", 0),
                          ("knn_k", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be >= {low}, got {getattr(self, name)}")
        check_transform(self.feature_transform)
        check_novelty_scores(self.novelty_scores, knn_bank=self.knn_bank)
        if self.knn_bank and self.knn_k > self.knn_bank:
            raise ConfigError(f"knn_k ({self.knn_k}) must not exceed knn_bank ({self.knn_bank})")


def protocol_options(config: RunConfig, *, precision: str | None = None) -> ProtocolOptions:
    """The protocol's options from the config's continual section, with its data.path, train.device and
    train.progress; `precision` None: the base run's."""
    section = config.continual
    return ProtocolOptions(
        order=tuple(section.order) if section.order else None, group_size=section.group_size,
        methods=tuple(section.methods), layer=section.layer, finetune_epochs=section.finetune_epochs,
        method_options=MethodOptions(shrinkage=section.shrinkage, class_shrinkage=section.class_shrinkage,
                                     prior=section.prior),
        joint=section.joint, data=config.data.path, device=config.train.device, precision=precision,
        out=section.out, progress=config.train.progress, feature_transform=section.feature_transform,
        novelty_scores=tuple(section.novelty_scores), knn_bank=section.knn_bank, knn_k=section.knn_k)


def plan_steps(base: Sequence[int], order: Sequence[int] | None, *, classes: Sequence[str],
               group_size: int) -> list[list[int]]:
    """[base, first group, second group, ...] as dataset class indices, after checking them."""
    if any(not 0 <= c < len(classes) for c in base) or len(set(base)) != len(base):
        raise ConfigError(f"base classes {list(base)} must be distinct class indices in 0..{len(classes) - 1}")
    order = [c for c in range(len(classes)) if c not in base] if order is None else list(order)
    for c in order:
        if not 0 <= c < len(classes):
            raise ConfigError(f"increment class {c} does not exist; valid: 0..{len(classes) - 1}")
        if c in base:
            raise ConfigError(f"increment class {c} ({classes[c]}) is already learned: it is a base class")
    if len(set(order)) != len(order):
        raise ConfigError(f"increment order {order} repeats a class; each class is learned once")
    return [list(base)] + [order[i:i + group_size] for i in range(0, len(order), group_size)]


def step_metrics(predictions: Tensor, targets: Tensor, seen: Tensor, novelty: Mapping[str, Tensor]) -> dict[str, Any]:
    """Scores of one method after one step over the whole test set: confusion matrix (rows = true
    class, all classes), per-class and overall accuracy, and for each novelty score of `novelty`
    ({name: (N,)}, the method's default score first) the AUROC and FPR at 95% TPR of flagging test
    images of classes not learned yet (`seen`: (K,) bool over dataset classes); `novelty_auroc` is the
    default score's."""
    cm = confusion_matrix(predictions, targets, len(seen))
    unseen = ~seen[targets]
    scored = {name: {"auroc": auroc(scores, unseen), "fpr95": fpr95(scores, unseen)}
              for name, scores in novelty.items()}
    default = next(iter(scored))
    return {"confusion_matrix": cm, "per_class_accuracy": per_class_accuracy(cm), "accuracy": accuracy(cm),
            "novelty_score": default, "novelty_auroc": scored[default]["auroc"], "novelty": scored}


def summarize_method(steps: Sequence[dict[str, Any] | None], seen: Tensor) -> dict[str, Any]:
    """Per-step lists (None where the method did not run) and the accuracy-matrix metrics."""
    measured = [i for i, step in enumerate(steps) if step is not None]
    acc = torch.stack([steps[i]["per_class_accuracy"] for i in measured])  # (S', K)
    seen_acc = seen_accuracy(acc, seen[measured]).tolist()
    every_step = len(measured) == len(steps)

    def per_step(values: Sequence[float]) -> list[float | None]:
        by_step = dict(zip(measured, values))
        return [_finite(by_step[i]) if i in by_step else None for i in range(len(steps))]

    return {
        "final_accuracy": steps[-1]["accuracy"] if steps[-1] is not None else None,
        "accuracy_per_step": per_step([steps[i]["accuracy"] for i in measured]),
        "seen_accuracy_per_step": per_step(seen_acc),
        "novelty_score": steps[measured[0]]["novelty_score"],  # the score of the two lists below
        "novelty_auroc_per_step": per_step([steps[i]["novelty_auroc"] for i in measured]),
        "novelty_fpr95_per_step": per_step([steps[i]["novelty"][steps[i]["novelty_score"]]["fpr95"] for i in measured]),
        "novelty": {score: {f"{metric}_per_step": per_step([steps[i]["novelty"][score][metric] for i in measured])
                            for metric in ("auroc", "fpr95")}
                    for score in steps[measured[0]]["novelty"]},
        "average_incremental_accuracy": average_incremental_accuracy(acc, seen[measured]) if every_step else None,
        "forgetting": _finite(forgetting(acc, seen[measured])) if every_step else None,
        "per_class_accuracy": [[_finite(v) for v in row] for row in acc.tolist()],
        "confusion_matrices": [steps[i]["confusion_matrix"].tolist() for i in measured],
    }


def train_base(config: RunConfig, base_classes: Sequence[int]) -> Path:
    """Train the backbone on `base_classes` only (relabelled 0..k-1, a k-way head) with the one
    engine; returns the run folder."""
    if len(base_classes) < 2:
        raise ConfigError(f"need at least 2 base classes to train a backbone, got {list(base_classes)}")
    return run_training(_override(config, {"data": {"classes": list(base_classes)}})).run_dir


def run_continual(config: RunConfig, base_classes: Sequence[int],
                  options: ProtocolOptions = ProtocolOptions()) -> dict[str, Any]:
    """Base training then the protocol on the new run: `cifarlab continual --recipe ... --base-classes`."""
    _check_before_training(config, base_classes, options)
    return run_protocol(train_base(config, base_classes), options)


def _check_before_training(config: RunConfig, base_classes: Sequence[int], options: ProtocolOptions) -> None:
    """The class plan, the feature layers and the output folder, checked before minutes of base training (the
    dataset loaded here is freed on return, before training loads its own copy)."""
    dataset = load_dataset(options.data or config.data.path, name=config.data.dataset, download=config.data.download,
                           progress=options.progress, image_size=config.data.image_size, labels=config.data.labels)
    plan_steps(base_classes, options.order, classes=dataset.classes, group_size=options.group_size)
    check_layers(create_model(config.model.name, num_classes=len(base_classes), **config.model.args), options.layer)
    if options.out:
        check_writable_folder(options.out, what="continual output folder")


def run_protocol(run: str | Path, options: ProtocolOptions = ProtocolOptions()) -> dict[str, Any]:
    """The protocol on a trained base run (its folder or checkpoint); returns and writes summary.json."""
    checkpoint = Path(run) / "best.pt" if Path(run).is_dir() else Path(run)
    device = hardware.resolve_device(options.device)
    loaded = load_model(checkpoint, device=device)
    model, preprocess, base_names, config = loaded.model, loaded.preprocess, loaded.classes, loaded.config
    dataset = load_dataset(options.data or config.data.path, name=config.data.dataset,
                           download=config.data.download, progress=options.progress,
                           image_size=config.data.image_size, labels=config.data.labels)
    base = _base_classes(config, dataset, base_names, checkpoint)
    steps = plan_steps(base, options.order, classes=dataset.classes, group_size=options.group_size)
    out = Path(options.out) if options.out else checkpoint.parent / "continual"
    say = print if options.progress else (lambda *_: None)
    num_classes = len(dataset.classes)
    image_size = dataset.train.images.shape[-1]
    precision = hardware.resolve_precision(device, options.precision or config.train.precision)
    backbone = describe_backbone(model, preprocess, layer=options.layer, image_size=image_size, precision=precision,
                                 checkpoint=str(checkpoint.resolve()))
    extract = partial(extract_features, preprocess=preprocess, layer=options.layer, batch_size=options.batch_size,
                      precision=precision)
    logits_of = partial(_logits, preprocess=preprocess, batch_size=options.batch_size, precision=precision)

    start = time.perf_counter()
    test_features, targets = extract(model, dataset.test.images), dataset.test.labels
    say(f"test features {tuple(test_features.shape)} in {time.perf_counter() - start:.1f} s")
    head_logits = logits_of(model, dataset.test.images)
    baselines = ["linear-head"] + (["finetune"] if options.finetune_epochs else [])
    log: dict[str, list[dict[str, Any] | None]] = {name: [] for name in (*options.methods, *baselines)}
    state = ContinualState.empty(backbone, test_features.shape[1], feature_transform=options.feature_transform,
                                 bank_size=options.knn_bank)
    scores = tuple(dict.fromkeys((GAUSSIAN_DEFAULT, *options.novelty_scores)))  # Gaussian methods' default first
    head_names = tuple(dict.fromkeys((HEAD_DEFAULT, *options.novelty_scores)))
    tuned, learned, timings = model, [], []
    seen = torch.zeros(len(steps), num_classes, dtype=torch.bool)
    for step, group in enumerate(steps):
        for c in group:
            start = time.perf_counter()
            images = dataset.train.images[dataset.train.labels == c]
            state = state.add_class(dataset.classes[c], extract(model, images).split(options.batch_size),
                                    backbone=backbone)
            timings.append({"class": dataset.classes[c], "images": len(images),
                            "seconds": time.perf_counter() - start})
        learned += group
        seen[step, learned] = True
        ids = torch.tensor(learned)  # classifier output index -> dataset class
        shared = bank_scores(state.stats, test_features, scores, k=options.knn_k)  # the same for every method
        for name in options.methods:
            clf = fit(name, state.stats, options.method_options)
            log[name].append(step_metrics(ids[clf.predict(test_features)], targets, seen[step],
                                          {**classifier_scores(clf, test_features, scores), **shared}))
        log["linear-head"].append(_head_metrics(head_logits, ids[:len(base)], targets, seen[step], head_names))
        if options.finetune_epochs:
            if step > 0:
                # The widened head's new rows are drawn from torch's generator: seeded per step, so the baseline
                # is the same whether the protocol runs after base training or alone on a saved run.
                torch.manual_seed(engine.epoch_seed(config.train.seed, step))
                tuned = _finetune(tuned, dataset, group, learned, config=config, preprocess=preprocess,
                                  epochs=options.finetune_epochs)
            log["finetune"].append(_head_metrics(logits_of(tuned, dataset.test.images), ids, targets, seen[step],
                                                 head_names))
        say(f"step {step}: +{[dataset.classes[c] for c in group]} -> "
            + ", ".join(f"{name} {log[name][-1]['accuracy']:.1%}" for name in log))
    if options.joint:
        # In ascending class order whatever the protocol's order: one joint run is the bound of every order.
        joint_classes = sorted(learned)
        joint = _train_joint(config, joint_classes, names=[dataset.classes[c] for c in joint_classes],
                             data=options.data, out=out / "joint", device=device)
        joint_logits = logits_of(joint.model, dataset.test.images, preprocess=joint.preprocess)
        log["joint"] = [None] * (len(steps) - 1) + [_head_metrics(joint_logits, torch.tensor(joint_classes), targets,
                                                                  seen[-1], head_names)]

    state_path = save_state(out / "state.pt", state)
    summary = {
        "base_run": str(checkpoint.parent),
        "checkpoint": str(checkpoint),
        "data": dataset.source,
        "backbone": backbone.to_dict(),
        "classes": list(dataset.classes),
        "base_classes": list(base),
        "steps": [[dataset.classes[c] for c in group] for group in steps],
        "classes_learned_per_step": [int(row.sum()) for row in seen],
        "method_options": asdict(options.method_options),
        "feature_transform": options.feature_transform,
        "novelty_scores": list(options.novelty_scores),
        "knn_bank": options.knn_bank,
        "knn_k": options.knn_k,
        "feature_dim": test_features.shape[1],
        "seconds_to_add_class": timings,
        "state": str(state_path),
        "methods": {name: summarize_method(steps_log, seen) for name, steps_log in log.items()},
    }
    _write_outputs(out, summary)
    say(f"wrote {out / 'summary.json'}")
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    """Two tables (percentages). One row per method: final accuracy on all classes, average incremental
    accuracy, forgetting, and the default novelty score's AUROC after the base step. Then one row per method
    and novelty score: AUROC and FPR at 95% TPR after the base step and their means over the steps that leave
    a class unseen."""
    def pct(value: float | None) -> float | None:
        return None if value is None else 100 * value

    def mean(values: Sequence[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) / len(known) if known else None

    rows = [{"method": name, "final acc %": pct(r["final_accuracy"]),
             "avg incremental acc %": pct(r["average_incremental_accuracy"]), "forgetting %": pct(r["forgetting"]),
             "novelty AUROC % (base)": pct(r["novelty_auroc_per_step"][0])}
            for name, r in summary["methods"].items()]
    novelty = [{"method": name, "novelty score": score, "AUROC % (base)": pct(s["auroc_per_step"][0]),
                "FPR95 % (base)": pct(s["fpr95_per_step"][0]), "mean AUROC %": pct(mean(s["auroc_per_step"])),
                "mean FPR95 %": pct(mean(s["fpr95_per_step"]))}
               for name, r in summary["methods"].items() for score, s in r.get("novelty", {}).items()
               if any(v is not None for v in s["auroc_per_step"])]
    table = format_table(rows, list(rows[0]))
    return table + ("\n\n" + format_table(novelty, list(novelty[0])) if novelty else "")


def _write_outputs(out: Path, summary: dict[str, Any]) -> None:
    write_json(out / "summary.json", summary)
    title = (f"{summary['backbone']['model']}: base {len(summary['base_classes'])} classes, "
             f"then {len(summary['steps']) - 1} increments")
    plot_accuracy_per_step(summary["methods"], summary["classes_learned_per_step"], out / "accuracy_per_step.png",
                           title=title)
    plot_novelty_per_step(summary["methods"], summary["classes_learned_per_step"], out / "novelty_per_step.png",
                          title=f"{title}; features: {summary['feature_transform']}")
    for name, result in summary["methods"].items():
        plot_confusion(torch.tensor(result["confusion_matrices"][-1]), summary["classes"], out / f"confusion_{name}.png")


def _override(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    return RunConfig.from_dict(merge(config.to_dict(), overrides), source="continual")


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value  # JSON has no NaN


def _base_classes(config: RunConfig, dataset: Dataset, base_names: Sequence[str], checkpoint: Path) -> list[int]:
    base = config.data.classes
    if base is None:
        raise ConfigError(f"{checkpoint} was trained on all classes; continual learning needs a backbone trained "
                          f"on base classes only (train it with --classes 0-4, or use --base-classes)")
    if [dataset.classes[c] for c in base] != list(base_names):
        raise DataError(f"{dataset.source} names classes {[dataset.classes[c] for c in base]} where the base run "
                        f"learned {list(base_names)}; pass the dataset the run was trained on")
    return list(base)


@torch.no_grad()
def _logits(model: nn.Module, images: Tensor, *, preprocess: Preprocessor, batch_size: int,
            precision: str = "fp32") -> Tensor:
    """The model's own head on its penultimate features: (N, outputs) on CPU."""
    features = extract_features(model, images, preprocess=preprocess, batch_size=batch_size, precision=precision)
    head = model.get_classifier()
    return head(features.to(head.weight.device)).float().cpu()


def _head_metrics(logits: Tensor, ids: Tensor, targets: Tensor, seen: Tensor, scores: Sequence[str]) -> dict[str, Any]:
    """Metrics of a softmax head whose output j is dataset class ids[j], with the head novelty scores among
    `scores` (continual.novelty: msp, energy), the first one its default."""
    return step_metrics(ids[logits.argmax(1)], targets, seen, head_scores(logits, scores))


def _widen_head(model: nn.Module, outputs: int) -> nn.Module:
    """A copy of `model` whose final Linear has `outputs` rows, the old rows kept."""
    model = copy.deepcopy(model)
    old = model.get_classifier()
    path = next(name for name, module in model.named_modules() if module is old)
    parent_name, _, attr = path.rpartition(".")
    new = nn.Linear(old.in_features, outputs, bias=old.bias is not None).to(old.weight.device)
    with torch.no_grad():
        new.weight[:old.out_features] = old.weight
        if old.bias is not None:
            new.bias[:old.out_features] = old.bias
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model


def _finetune(model: nn.Module, dataset: Dataset, group: Sequence[int], learned: Sequence[int], *,
              config: RunConfig, preprocess: Preprocessor, epochs: int) -> nn.Module:
    """Naive fine-tuning: the whole network + a head widened to every learned class, trained with
    the base run's optimizer on the new group's images only (no augmentation, no old data)."""
    model = _widen_head(model, len(learned))
    device = next(model.parameters()).device
    relabel = relabelling(learned, len(dataset.classes))

    def new_group(split: Split) -> Split:
        mask = torch.isin(split.labels, torch.tensor(list(group)))
        return Split(split.images[mask].to(device), relabel[split.labels[mask]].to(device))

    settings = _override(config, {"train": {"epochs": epochs, "progress": False, "out": None, "compile": False},
                                  "optim": {"warmup_epochs": 0.0}})
    data = TrainData(
        train=BatchLoader(new_group(dataset.train), batch_size=config.train.batch_size, preprocess=preprocess,
                          sampling="shuffle"),
        evals={"test": BatchLoader(new_group(dataset.test), batch_size=config.train.eval_batch_size,
                                   preprocess=preprocess)},
        preprocess=preprocess, classes=tuple(dataset.classes[c] for c in learned), source=dataset.source)
    return engine.fit(model, data=data, config=settings).model


def _train_joint(config: RunConfig, classes: Sequence[int], *, names: Sequence[str], data: str | None, out: Path,
                 device: torch.device) -> LoadedModel:
    """The upper bound: the base run's recipe trained on every learned class at once; a finished
    joint run already in `out` (same classes) is reused rather than trained again, so a joint folder copied
    into the output of another class order is reused there too."""
    if not (out / "summary.json").is_file():
        overrides: dict[str, Any] = {"train": {"out": str(out)}}
        if data is not None:
            overrides["data"] = {"path": data}
        train_base(_override(config, overrides), classes)
    joint = load_model(out / "best.pt", device=device)
    if list(joint.classes) != list(names):
        raise ConfigError(f"{out} holds a joint run over {list(joint.classes)}, not {list(names)}; "
                          f"remove it or choose another --out")
    return joint
