"""LeNet-style CNNs of the PyTorch "Deep Learning with PyTorch: A 60 Minute Blitz" tutorial.

Source: https://pytorch.org/tutorials/beginner/blitz/cifar10_tutorial.html ("Training a
Classifier"), itself after LeCun et al. 1998. The two variants are this project's deeper and
wider takes on it. All three expect 32x32 inputs (the flattened size is fixed).
"""
from __future__ import annotations

from torch import Tensor, nn

from cifarlab.models.layers import CifarModel
from cifarlab.models.registry import register_model


class LeNet(CifarModel):
    """Conv-ReLU-maxpool stages, then fc-ReLU-fc-ReLU-fc."""

    def __init__(self, channels: tuple[int, ...], *, kernel: int, padding: int, flat: int,
                 num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for in_ch, out_ch in zip((3, *channels), channels):
            layers += [nn.Conv2d(in_ch, out_ch, kernel, padding=padding), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(flat, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc = nn.Linear(84, num_classes)
        self.relu = nn.ReLU()

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.features(x).flatten(1)  # (B, flat)
        return self.relu(self.fc2(self.relu(self.fc1(x))))  # (B, 84)


@register_model
def tutorial(*, num_classes: int = 10) -> LeNet:
    """PyTorch 60-minute blitz LeNet: conv5x5 6-16, pool, fc 400-120-84 (62,006 params)."""
    return LeNet((6, 16), kernel=5, padding=0, flat=16 * 5 * 5, num_classes=num_classes)


@register_model
def tutorial_deep(*, num_classes: int = 10) -> LeNet:
    """Tutorial LeNet with 3 conv5x5 (padding 2)/pool stages 6-16-32, fc 512-120-84."""
    # Padding keeps 5x5 convs usable for a third stage: 32 -> 16 -> 8 -> 4, so 32*4*4 = 512.
    return LeNet((6, 16, 32), kernel=5, padding=2, flat=32 * 4 * 4, num_classes=num_classes)


@register_model
def tutorial_wide(*, num_classes: int = 10) -> LeNet:
    """Tutorial LeNet with 3 unpadded conv3x3/pool stages 6-18-72, fc 288-120-84."""
    # 32 -conv-> 30 -pool-> 15 -conv-> 13 -pool-> 6 -conv-> 4 -pool-> 2, so 72*2*2 = 288.
    return LeNet((6, 18, 72), kernel=3, padding=0, flat=72 * 2 * 2, num_classes=num_classes)
