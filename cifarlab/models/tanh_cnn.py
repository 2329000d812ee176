"""The end-to-end CNN of private-learning baselines: 3 stages of two 3x3 convs with tanh, then fc 128.

Papernot, Thakurta, Song, Chien, Erlingsson 2021, "Tempered Sigmoid Activations for Deep Learning with
Differential Privacy" (AAAI; arXiv:2007.14191): a bounded activation (tanh) keeps the per-example gradients
that DP-SGD clips small, which trains better under DP than ReLU. Tramer & Boneh 2021 ("Differentially Private
Learning Needs Better Features", ICLR) use it as their end-to-end CNN baseline (59.2% on CIFAR-10 at epsilon 3).
No normalisation layer, so nothing to replace for DP-SGD.
"""
from __future__ import annotations

from torch import Tensor, nn

from cifarlab.models.layers import CifarModel
from cifarlab.models.registry import register_model


class TanhCNN(CifarModel):
    """[conv3x3 - tanh - conv3x3 - tanh - maxpool2] x 3 (32-64-128 channels), fc 128 - tanh, fc."""

    def __init__(self, *, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for in_ch, out_ch in ((3, 32), (32, 64), (64, 128)):
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.Tanh(),
                       nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)  # a no-op at 32x32; lets other input sizes through
        self.fc1 = nn.Linear(128 * 4 * 4, 128)
        self.tanh = nn.Tanh()
        self.fc = nn.Linear(128, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.tanh(self.fc1(self.pool(self.features(x)).flatten(1)))  # (B, 128)


@register_model
def tanh_cnn(*, num_classes: int = 10) -> TanhCNN:
    """Papernot et al. 2021 / Tramer & Boneh 2021 DP baseline: 3x [conv3x3-tanh x2, maxpool] 32-64-128, fc 128"""
    return TanhCNN(num_classes=num_classes)
