"""The model zoo: `create_model(name, num_classes=..., **kwargs)`, `list_models()`, `describe_model(name)`.

Each family lives in its own module and registers its builders when imported below; the import
list is the registry's table of contents.
"""
# Importing a family module registers its models.
from cifarlab.models import cnn, preact_resnet, resnet, resnet_cifar, tutorial, vgg, wrn  # noqa: F401
from cifarlab.models import fast  # noqa: F401  (airbench-style net for time-to-accuracy)
from cifarlab.models import scatter  # noqa: F401  (ScatterNet + linear/CNN for DP-SGD)
from cifarlab.models import tanh_cnn  # noqa: F401  (the end-to-end DP-SGD baseline CNN)
from cifarlab.models.registry import EXTERNAL_NOTE, create_model, describe_model, list_models, register_model

__all__ = ["EXTERNAL_NOTE", "create_model", "describe_model", "list_models", "register_model"]
