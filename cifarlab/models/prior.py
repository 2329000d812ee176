"""A prior: the first layers of a model, learned apart from any run (`cifarlab prior`, from random processes), saved
in a file of their own and loaded into the model of a later run, frozen or to be fine-tuned.

A prior is the model's `features` stack, the layers between the image and the first fully connected layer (in
`cnn`, `tanh_cnn`, `tutorial*`, `vgg`). The file holds the model's name, those layers' weights, the input
preprocessing they were learned on and how they were learned; it is written with `cifarlab.io.save_tensors` and
read back with `weights_only=True`. It sits with the models, below the config, because a run's config is checked
against it before any work (`RunConfig.check_prior`).

A frozen prior is a fixed function of each image, as the scattering transform of `scatter_*` is: `load_prior`
turns the layers into `FrozenLayers` (the same modules and state_dict keys), which let their own outputs through,
so a run without augmentation computes them once per image (train.run.precompute_frozen_prefix) and trains the
rest of the model on them, and its checkpoints load into the ordinary model.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from cifarlab.errors import ConfigError
from cifarlab.io import load_tensors, save_tensors

FORMAT = "cifarlab-prior/1"
PRIOR_LAYERS = "features"  # the submodule a prior holds


class FrozenLayers(nn.Sequential):
    """A frozen prior's layers that pass through inputs that are already their outputs, told apart from images by
    the channel count (3 in; 16 or more out of every model with a `features` stack)."""

    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__(OrderedDict(layers.named_children()))
        self.in_channels = next(m.in_channels for m in layers.modules() if isinstance(m, nn.Conv2d))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) if x.shape[1] == self.in_channels else x


def frozen_prior(model: nn.Module) -> FrozenLayers | None:
    """`model`'s frozen prior layers, or None when it has none."""
    layers = getattr(model, PRIOR_LAYERS, None)
    return layers if isinstance(layers, FrozenLayers) else None


def prior_layers(model: nn.Module) -> nn.Module:
    """The layers of `model` a prior holds; ConfigError when it has none."""
    layers = getattr(model, PRIOR_LAYERS, None)
    if not isinstance(layers, nn.Module):
        name = getattr(model, "model_name", type(model).__name__)
        raise ConfigError(f"model {name!r} has no `{PRIOR_LAYERS}` stack, which a prior holds; choose cnn, tanh_cnn, "
                          "tutorial, tutorial_deep or tutorial_wide")
    return layers


def save_prior(path: str | Path, model: nn.Module, *, preprocess: str, facts: dict[str, Any]) -> Path:
    """Write `model`'s prior layers (model from cifarlab.models.create_model) with the input preprocessing they
    expect and `facts` (how they were learned: plain values)."""
    return save_tensors(path, {"format": FORMAT, "model": model.model_name, "layers": PRIOR_LAYERS,
                               "state": prior_layers(model).state_dict(), "preprocess": preprocess, "facts": facts})


def read_prior(path: str | Path) -> dict[str, Any]:
    """The prior file's contents; ConfigError when it is missing or not a prior."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.prior {path} does not exist; build it first with `cifarlab prior --out "
                          f"{path.parent}` (it writes {path.parent / 'prior.pt'})")
    payload = load_tensors(path, what="prior")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"model.prior {path} is not a cifarlab prior (expected format {FORMAT!r}); build one with "
                          "`cifarlab prior`")
    return payload


def load_prior(model: nn.Module, path: str | Path, *, freeze: bool, preprocess: str) -> dict[str, Any]:
    """Load the prior at `path` into `model`'s prior layers, in place; with `freeze` those layers are not trained
    (requires_grad False). `preprocess` is the run's input preprocessing, which must be the prior's. ConfigError,
    naming the file and the mismatch, when the prior was learned for another architecture or other inputs.
    Returns the file's contents."""
    layers = prior_layers(model)
    payload = read_prior(path)
    name = getattr(model, "model_name", type(model).__name__)
    if payload["model"] != name:
        raise ConfigError(f"model.prior {path} was pretrained for model {payload['model']!r}, but the run's model is "
                          f"{name!r}; build a prior for {name} (`cifarlab prior --model {name}`) or use model "
                          f"{payload['model']}")
    if payload["preprocess"] != preprocess:
        raise ConfigError(f"model.prior {path} was pretrained on inputs preprocessed {payload['preprocess']!r}, but "
                          f"the run's data.preprocess is {preprocess!r}; its layers would see other values than they "
                          "learned from")
    expected = {key: tuple(value.shape) for key, value in layers.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in payload["state"].items()}
    if expected != found:
        differ = sorted(key for key in expected.keys() & found.keys() if expected[key] != found[key])
        missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
        problems = [f"{PRIOR_LAYERS}.{key}: {found[key]} in the prior, {expected[key]} in the model" for key in differ]
        problems += [f"{PRIOR_LAYERS}.{key} missing from the prior" for key in missing]
        problems += [f"{PRIOR_LAYERS}.{key} not in the model" for key in extra]
        raise ConfigError(f"model.prior {path} does not fit model {name!r} (args {getattr(model, 'model_args', {})}): "
                          + "; ".join(problems))
    layers.load_state_dict(payload["state"])
    layers.requires_grad_(not freeze)
    if freeze and isinstance(layers, nn.Sequential):
        setattr(model, PRIOR_LAYERS, FrozenLayers(layers))
    return payload
