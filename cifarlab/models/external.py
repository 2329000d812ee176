"""Models from torchvision (`torchvision:<name>`) and timm (`timm:<name>`), imported only when asked for.

Both are wrapped to the cifarlab model interface (`forward_features`, `get_classifier`) through
the library's own API: timm's `forward_features` + `forward_head(pre_logits=True)` and
`get_classifier()`; for torchvision, whose models have no such API, the final nn.Linear (fc,
classifier[-1], heads.head, ...) is moved out and replaced by an identity. Weights are random
unless `pretrained=True` (timm) or `weights="DEFAULT"` (torchvision) is passed, which downloads.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from torch import Tensor, nn

from cifarlab.errors import ConfigError


def create_external(name: str, *, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build `torchvision:<arch>` or `timm:<arch>` with `num_classes` outputs, wrapped."""
    library, _, arch = name.partition(":")
    if library == "timm":
        timm = _import(library, name)
        if not timm.is_model(arch):
            raise ConfigError(f"timm has no model {arch!r}; see timm.list_models()")
        return TimmModel(timm.create_model(arch, num_classes=num_classes, **kwargs))
    models = _import(f"{library}.models", name)
    if arch not in models.list_models():
        raise ConfigError(f"torchvision has no model {arch!r}; valid: {', '.join(models.list_models())}")
    return TorchvisionModel(models.get_model(arch, num_classes=num_classes, **kwargs), name=name)


def _import(module: str, name: str) -> ModuleType:
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except (ImportError, RuntimeError) as err:  # RuntimeError: a torchvision built for another torch
        raise ConfigError(f"model {name!r} needs {package}, which cannot be imported ({err}); "
                          f"install {package} (pip install {package})") from err


class TimmModel(nn.Module):
    """A timm model behind the cifarlab interface; `net` is the untouched timm model."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        if not isinstance(net.get_classifier(), nn.Linear):
            raise ConfigError(f"timm model {type(net).__name__} has no single nn.Linear classifier "
                              f"(got {type(net.get_classifier()).__name__})")
        self.net = net

    def forward_features(self, x: Tensor) -> Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)  # (B, D)

    def get_classifier(self) -> nn.Linear:
        return self.net.get_classifier()

    def forward(self, x: Tensor) -> Tensor:
        return self.get_classifier()(self.forward_features(x))


class TorchvisionModel(nn.Module):
    """A torchvision model whose last nn.Linear is moved to `fc`; `net` then returns features."""

    def __init__(self, net: nn.Module, *, name: str) -> None:
        super().__init__()
        linears = [qualified for qualified, module in net.named_modules() if isinstance(module, nn.Linear)]
        if not linears:
            raise ConfigError(f"model {name!r} has no nn.Linear classifier; only such models can be wrapped")
        parent_name, _, attr = linears[-1].rpartition(".")
        parent = net.get_submodule(parent_name)
        self.fc: nn.Linear = getattr(parent, attr)
        setattr(parent, attr, nn.Identity())  # net(x) now stops at the classifier's input
        self.net = net

    def forward_features(self, x: Tensor) -> Tensor:
        return self.net(x).flatten(1)  # (B, D)

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))
