"""Models whose every layer has a per-example gradient, as DP-SGD (Abadi et al. 2016) needs: batch norm mixes the
examples of a batch, so it is replaced by group norm (Wu & He 2018), the replacement Opacus's validators make.

It sits with the models, below training, because loading a checkpoint of a private run rebuilds the same
architecture (cifarlab.train.checkpoint.load_model).
"""
from __future__ import annotations

import copy
import warnings

from opacus.validators import ModuleValidator
from torch import nn

from cifarlab.errors import ConfigError


def prepare_model(model: nn.Module) -> nn.Module:
    """A copy of `model` that DP-SGD can train: BatchNorm replaced by GroupNorm (with a warning), in-place
    activations turned off (Opacus's hooks cannot see through them). ConfigError names any layer that
    cannot be made private, says why, and what to do."""
    if hasattr(model, "init_from_data"):
        raise ConfigError(
            f"{type(model).__name__} fits layers to training images before training (init_from_data); those "
            "statistics would leak outside DP-SGD. Choose a model without data-dependent initialisation "
            "(e.g. wrn with norm=group, cnn, tutorial)")
    model = copy.deepcopy(model).train()
    problems = privacy_problems(model)
    if problems:
        model = ModuleValidator.fix(model)  # a copy with BatchNorm -> GroupNorm (Wu & He 2018)
        replaced = [kind for name, kind, _ in problems if type(model.get_submodule(name)).__name__ != kind]
        if replaced:
            warnings.warn(
                f"DP-SGD: replaced {len(replaced)} {'/'.join(sorted(set(replaced)))} layer(s) by GroupNorm: batch "
                "statistics mix the examples of a batch, so per-example gradients (and the privacy guarantee) "
                "do not exist with them", stacklevel=2)
    require_per_example_layers(model, purpose="DP-SGD",
                               fix="replace these layers by per-example ones (GroupNorm, LayerNorm) or choose another model")
    disable_inplace(model)
    return model


def require_per_example_layers(model: nn.Module, *, purpose: str, fix: str) -> None:
    """ConfigError naming every layer that has no per-example gradient (batch norm mixes a batch's examples)."""
    problems = privacy_problems(model)
    if problems:
        lines = "\n".join(f"  layer {name!r} ({kind}): {why}" for name, kind, why in problems)
        raise ConfigError(f"{type(model).__name__} cannot be trained with {purpose}:\n{lines}\nFix: {fix}")


def disable_inplace(model: nn.Module) -> None:
    """Turn off in-place activations (the same function, so checkpoints still load): per-example gradient hooks
    cannot see through an output that a later op overwrites."""
    for module in model.modules():
        if getattr(module, "inplace", False):
            module.inplace = False


def privacy_problems(model: nn.Module) -> list[tuple[str, str, str]]:
    """(layer name, layer type, why) for every layer Opacus's validators reject."""
    problems = []
    for name, module in model.named_modules():
        validator = ModuleValidator.VALIDATORS.get(type(module))
        if validator is not None:  # also parameter-free ones: a BatchNorm without affine still mixes the batch
            problems += [(name, type(module).__name__, str(error).split(". ")[0]) for error in validator(module)]
    return problems
