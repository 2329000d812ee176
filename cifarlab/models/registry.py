"""Model registry: `@register_model` builders, `create_model(name, **kwargs)`, `list_models()`.

A builder is a function with keyword-only arguments (`num_classes` plus the model's own) whose
name is the model name and whose first docstring line describes it. `create_model` records the
name and the fully resolved arguments on the model (`model.model_name`, `model.model_args`), so
a checkpoint can store them and rebuild the model with `create_model(name, **args)`.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from cifarlab.errors import ConfigError

Builder = Callable[..., nn.Module]

EXTERNAL_PREFIXES = ("torchvision:", "timm:")
EXTERNAL_NOTE = "also torchvision:<name> and timm:<name> when that package is installed"

_REGISTRY: dict[str, Builder] = {}
_PLAIN = (bool, int, float, str, type(None))


def register_model(builder: Builder) -> Builder:
    """Add `builder` to the registry under its function name (use as a decorator)."""
    name = builder.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = builder
    return builder


def list_models() -> list[str]:
    """Sorted names of the native models (see EXTERNAL_NOTE for the torchvision:/timm: ones)."""
    return sorted(_REGISTRY)


def describe_model(name: str) -> str:
    """The first line of the model's docstring."""
    if name.startswith(EXTERNAL_PREFIXES):
        library, _, arch = name.partition(":")
        return f"{arch} from {library} (external; needs {library} installed)"
    return (inspect.getdoc(_builder(name)) or "").splitlines()[0]


def create_model(name: str, *, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build model `name` with freshly initialised weights (seed torch for reproducible init)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer; got {num_classes!r}")
    for key, value in kwargs.items():
        if not isinstance(value, _PLAIN):
            raise ConfigError(f"model {name!r}: argument {key}={value!r} must be a plain value "
                              "(bool, int, float, str or None) so checkpoints can store it")
    if name.startswith(EXTERNAL_PREFIXES):
        from cifarlab.models.external import create_external  # imports torchvision/timm lazily

        model = create_external(name, num_classes=num_classes, **kwargs)
        args = {"num_classes": num_classes, **kwargs}
    else:
        builder = _builder(name)
        signature = inspect.signature(builder)
        unknown = sorted(set(kwargs) - set(signature.parameters))
        if unknown:
            accepted = ", ".join(p for p in signature.parameters if p != "num_classes")
            raise ConfigError(f"model {name!r} got unknown argument(s) {', '.join(unknown)}; "
                              f"it accepts: {accepted or 'none'}")
        bound = signature.bind(num_classes=num_classes, **kwargs)
        bound.apply_defaults()  # store defaults too, so a later change of default can't alter a saved model
        args = dict(bound.arguments)
        model = builder(**args)
    model.model_name = name
    model.model_args = args
    return model


def _builder(name: str) -> Builder:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; valid: {', '.join(list_models())} ({EXTERNAL_NOTE})")
    return _REGISTRY[name]
