"""Features of a frozen backbone, and the identity of the backbone that made them.

Pipeline per batch: uint8 -> float in [0, 1] -> Preprocessor (normalise, resize to the input size the
backbone was trained at) -> network, read at `forward_features` (the penultimate layer), at named layers through
forward hooks (average-pooled, and averaged over test-time views like the penultimate features), or at several of
them concatenated: the pooled maps of an earlier block keep more of what the base classes did not need, which the
classes learned later use (see docs/continual.md). The protocol and `continual add` both go through `extract_features` with the same
batch size, so a class learned from a folder gets bit-for-bit the features the protocol would compute.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from cifarlab.config import PENULTIMATE, parse_layers
from cifarlab.data.preprocess import Preprocessor
from cifarlab.errors import CheckpointError, ConfigError, DataError
from cifarlab.hardware import autocast_for


# Images per forward pass, the same in the protocol and in `continual add` (see the module docstring): the
# rounding of a feature depends on the batch it was computed in (~3e-8 here), so both must batch alike.
# Small batches keep the activations in cache: 5,000 images through the fast-cpu net with mirror TTA on
# 2 CPU cores took 2.25-2.4 s in batches of 64 to 256, 3.05 s of 384 and 3.3 s of 500.
FEATURE_BATCH_SIZE = 128


@dataclass(frozen=True)
class Backbone:
    """Which network, read where and how, produced a set of features. Features from two
    backbones live in different spaces, so a classifier state only accepts its own."""

    model: str
    model_args: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""          # sha256 of the weights and the preprocessing (see `fingerprint`)
    layer: str | None = None       # None: forward_features
    input_size: int | None = None  # side the preprocessor resizes inputs to (the training size); None: as stored
    image_size: int = 32           # side of the stored images (a folder of new images is read at it)
    precision: str = "fp32"        # "bf16": the network ran under bf16 autocast (states before it: fp32)
    # "mean": inner layers read over the whole forward pass, averaged over test-time views; "" for penultimate-only
    # features and for states saved before, whose inner layers were read from the first view only
    layer_views: str = ""
    checkpoint: str | None = None  # where to rebuild the network from (not part of the identity)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "model_args": dict(self.model_args), "fingerprint": self.fingerprint,
                "layer": self.layer, "input_size": self.input_size, "image_size": self.image_size,
                "precision": self.precision, "layer_views": self.layer_views, "checkpoint": self.checkpoint}

    def describe(self) -> str:
        where = f"layer {self.layer!r}" if self.layer else "forward_features"
        if self.layer:
            where += ", views averaged" if self.layer_views == "mean" else ", first view only"
        size = f", input {self.input_size}px" if self.input_size else ""
        return f"{self.model} {self.model_args} at {where}{size}, {self.precision}, weights {self.fingerprint[:12]}"


def check_same_backbone(expected: Backbone, actual: Backbone) -> None:
    """CheckpointError unless both describe the same network, layer, input size and precision."""
    def identity(b: Backbone) -> tuple:
        return (b.model, sorted(b.model_args.items()), b.fingerprint, b.layer, b.input_size, b.image_size, b.precision,
                b.layer_views)

    if identity(expected) != identity(actual):
        raise CheckpointError(f"the classifier state was built on backbone [{expected.describe()}] but these "
                              f"features come from [{actual.describe()}]; use the state's own backbone "
                              f"checkpoint ({expected.checkpoint}) or build a new state")


def fingerprint(model: nn.Module, preprocess: Preprocessor) -> str:
    """sha256 over every weight/buffer and the preprocessing, in a fixed order: any change to
    either changes the features, so it changes the fingerprint."""
    digest = hashlib.sha256()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"preprocess.{k}": v for k, v in preprocess.state().items() if isinstance(v, Tensor)})
    digest.update(preprocess.kind.encode())
    if preprocess.size is not None:  # only then, so states made before inputs could be resized keep their print
        digest.update(f"size:{preprocess.size}".encode())
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def describe_backbone(model: nn.Module, preprocess: Preprocessor, *, layer: str | None = None,
                      image_size: int = 32, precision: str = "fp32", checkpoint: str | None = None) -> Backbone:
    """The Backbone record of a cifarlab model (built by create_model, so it knows its name and args)."""
    if precision not in ("fp32", "bf16"):  # resolved already: "auto" means different things on different devices
        raise ConfigError(f"feature precision must be fp32 or bf16, got {precision!r}")
    return Backbone(model=getattr(model, "model_name", type(model).__name__),
                    model_args=dict(getattr(model, "model_args", {})), fingerprint=fingerprint(model, preprocess),
                    layer=layer, input_size=preprocess.size, image_size=image_size, precision=precision,
                    layer_views="mean" if layer else "", checkpoint=checkpoint)


def check_layers(model: nn.Module, layer: str | None) -> None:
    """Raise ConfigError naming the first module of `layer` (see `parse_layers`) that `model` lacks."""
    for name in parse_layers(layer):
        if name != PENULTIMATE:
            _find_layer(model, name)


def _find_layer(model: nn.Module, layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if layer not in modules or layer == "":
        names = [name for name in modules if name]
        raise ConfigError(f"model has no layer {layer!r}; layers: {PENULTIMATE}, {', '.join(names[:40])}"
                          f"{' ...' if len(names) > 40 else ''}")
    return modules[layer]


def _pool(output: Tensor) -> Tensor:
    """(B, C, H, W) maps -> (B, C) by global average pooling, as Lee et al. 2018 do for inner layers."""
    return output.mean(dim=(2, 3)) if output.dim() == 4 else output.flatten(1)


class _LayerReader:
    """Forward hooks that sum the pooled output of each named module over its calls in one forward pass: a
    network with test-time augmentation runs every layer once per view, and the layer's feature is the mean over
    the views, as the penultimate features are."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.sums: dict[str, Tensor] = {}
        self.calls: dict[str, int] = {}
        self.handles = [_find_layer(model, name).register_forward_hook(self._hook(name))
                        for name in names if name != PENULTIMATE]

    def _hook(self, name: str) -> Callable:
        def record(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            pooled = _pool(output).float()
            self.sums[name] = self.sums[name] + pooled if name in self.sums else pooled
            self.calls[name] = self.calls.get(name, 0) + 1
        return record

    def read(self, layer: str) -> Tensor:
        """The mean pooled output of `layer` since the last read."""
        if layer not in self.calls:
            raise ConfigError(f"layer {layer!r} was not called in the forward pass; choose another layer")
        return self.sums.pop(layer) / self.calls.pop(layer)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def extract_features(model: nn.Module, images: Tensor, *, preprocess: Preprocessor, layer: str | None = None,
                     batch_size: int = FEATURE_BATCH_SIZE, precision: str = "fp32") -> Tensor:
    """Features (N, D) float32 on CPU of uint8 images (N, 3, H, W), the model in eval mode.

    The model and preprocess stay where they are (their device is used); the model's
    train/eval mode is restored afterwards. Batches enter the network in channels_last
    layout, which oneDNN's CPU convolutions run 1.6-1.9x faster than NCHW (the fast-cpu net
    on 2 cores); the features differ from NCHW ones only by float32 rounding (~1e-9), and
    every caller gets the same layout. precision "bf16" runs the network under bf16 autocast:
    on a CPU with native bf16 the fast-cpu net with mirror TTA made all 60,000 CIFAR-10 features
    in 21 s instead of 43 s, and LDA / QDA-shrink on them scored within 0.1 point of fp32.
    `layer` (see `parse_layers`): None for the penultimate features, else a comma list of module names and
    "penultimate", whose features are concatenated in that order.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise DataError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    device = next(model.parameters()).device
    autocast = autocast_for(device, precision)
    names = parse_layers(layer)
    was_training = model.training
    model.eval()
    reader = _LayerReader(model, names)
    features = []
    try:
        with torch.inference_mode():
            for chunk in images.split(batch_size):
                x = preprocess.from_uint8(chunk.to(device)).contiguous(memory_format=torch.channels_last)
                with autocast():
                    penultimate = model.forward_features(x).float()
                parts = [penultimate if name == PENULTIMATE else reader.read(name) for name in names]
                features.append(torch.cat(parts, dim=1).cpu())
    finally:
        model.train(was_training)
        reader.remove()
    return torch.cat(features)  # outside inference mode: an ordinary tensor that callers may modify
