"""Export a checkpoint as a self-contained model for serving without cifarlab: ONNX or TorchScript.

The exported model takes uint8 images (N, H, W, 3), channels last as image libraries decode them, at the size
`cifarlab predict` reads them (the run's data.image_size, else 32), and returns class probabilities (N, classes).
The checkpoint's preprocessing and input resize are inside it; the class names go with it: ONNX metadata_props
"classes" (a JSON list), a TorchScript attribute `classes` and extra file "classes.json".
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from cifarlab.data.preprocess import Preprocessor, to_float
from cifarlab.errors import ConfigError
from cifarlab.io import atomic_write, check_writable_folder
from cifarlab.train.checkpoint import load_model

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17
# What predict decodes image files to when the run did not resize its images (CIFAR's own size).
DEFAULT_IMAGE_SIZE = 32


class ServingModel(nn.Module):
    """uint8 (N, H, W, 3) -> probabilities (N, classes): the checkpoint's preprocessing, network and softmax."""

    def __init__(self, model: nn.Module, preprocess: Preprocessor) -> None:
        super().__init__()
        self.model, self.preprocess = model, preprocess

    def forward(self, images: Tensor) -> Tensor:
        x = to_float(images.permute(0, 3, 1, 2))  # (N, 3, H, W) in [0, 1], as predict feeds the network
        return self.model(self.preprocess(x)).softmax(1)


class _Labelled(nn.Module):
    """A traced serving model with its class names as a scripted attribute (List[str], inferred from the value)."""

    def __init__(self, traced: nn.Module, classes: list[str]) -> None:
        super().__init__()
        self.traced, self.classes = traced, classes

    def forward(self, images: Tensor) -> Tensor:
        return self.traced(images)


def export_checkpoint(checkpoint: str | Path, *, format: str, out: str | Path) -> Path:
    """Write the checkpoint's model as `format` to `out` atomically; nothing is written when export fails."""
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    check_writable_folder(Path(out).expanduser().absolute().parent, what="export folder")
    loaded = load_model(checkpoint, device="cpu")
    _refuse_unexportable(loaded.model, name=loaded.config.model.name)
    serving = ServingModel(loaded.model, loaded.preprocess).eval().requires_grad_(False)  # outputs need no graph
    side = loaded.config.data.image_size or DEFAULT_IMAGE_SIZE
    example = torch.zeros(2, side, side, 3, dtype=torch.uint8)  # 2: a batch axis the trace cannot mistake for 1
    classes = list(loaded.classes)
    try:
        with warnings.catch_warnings():
            # The input size is fixed, so the branches on shapes the tracer warns about are constants indeed.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            if format == "onnx":
                return _write_onnx(serving, example, classes=classes, out=out)
            return _write_torchscript(serving, example, classes=classes, out=out)
    except (RuntimeError, torch.onnx.errors.OnnxExporterError) as error:
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(f"cannot export model {loaded.config.model.name!r} to {format}: {reason}") from None


def _refuse_unexportable(model: nn.Module, *, name: str) -> None:
    """Layers that declare why a trace of them would be wrong (`export_refusal`) stop the export by name."""
    for layer_name, layer in model.named_modules():
        reason = getattr(layer, "export_refusal", None)
        if reason:
            raise ConfigError(f"cannot export model {name!r}: its layer {layer_name!r} ({type(layer).__name__}) "
                              f"{reason}")


def _write_onnx(serving: nn.Module, example: Tensor, *, classes: list[str], out: str | Path) -> Path:
    try:
        import onnx
    except ImportError:
        raise ConfigError('ONNX export needs the onnx package: pip install "cifarlab[export]"') from None
    buffer = io.BytesIO()
    # The TorchScript-based exporter: it needs no onnxscript, and the models here are plain static graphs.
    torch.onnx.export(serving, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET, input_names=["images"],
                      output_names=["probabilities"],
                      dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}})
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(proto, {"classes": json.dumps(classes)})
    return atomic_write(out, lambda tmp: onnx.save(proto, str(tmp)))


def _write_torchscript(serving: nn.Module, example: Tensor, *, classes: list[str], out: str | Path) -> Path:
    with torch.no_grad():
        traced = torch.jit.trace(serving, (example,))
    scripted = torch.jit.script(_Labelled(traced, classes))
    extra = {"classes.json": json.dumps(classes)}
    return atomic_write(out, lambda tmp: torch.jit.save(scripted, str(tmp), _extra_files=extra))
