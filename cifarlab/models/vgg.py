"""VGG-style CIFAR network (Simonyan & Zisserman 2015, arXiv:1409.1556) with BatchNorm and dropout.

Conv3x3-BN-ReLU groups of 2x64, 2x128 and 4x256 channels, each followed by a 2x2 maxpool and
dropout; then two 1024-unit fully connected layers with dropout. This is the compact
VGG adaptation common in CIFAR-10 tutorials (e.g. the Keras CIFAR examples), not one of the
ImageNet configurations A-E.
"""
from __future__ import annotations

from torch import Tensor, nn

from cifarlab.models.layers import CifarModel, check_dropout
from cifarlab.models.registry import register_model


class VGG(CifarModel):
    """VGG-like: conv groups (64, 64 | 128, 128 | 256 x4), fc 1024-1024, fc."""

    def __init__(self, *, conv_dropout: float, dropout: float, num_classes: int) -> None:
        super().__init__()
        conv_dropout, dropout = check_dropout(conv_dropout, name="conv_dropout"), check_dropout(dropout)
        layers: list[nn.Module] = []
        in_ch = 3
        for out_ch, convs in ((64, 2), (128, 2), (256, 4)):
            for _ in range(convs):
                layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                           nn.ReLU(inplace=True)]
                in_ch = out_ch
            layers += [nn.MaxPool2d(2), nn.Dropout(conv_dropout)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)  # a no-op at 32x32; lets other input sizes through
        self.head = nn.Sequential(
            nn.Linear(256 * 4 * 4, 1024), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(1024, 1024), nn.ReLU(inplace=True), nn.Dropout(dropout),
        )
        self.fc = nn.Linear(1024, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(x)).flatten(1)  # (B, 4096)
        return self.head(x)  # (B, 1024)


@register_model
def vgg(*, num_classes: int = 10, conv_dropout: float = 0.25, dropout: float = 0.5) -> VGG:
    """VGG-like: 2x64, 2x128, 4x256 conv3x3+BN+ReLU, pool+dropout per group, fc 1024-1024."""
    return VGG(conv_dropout=conv_dropout, dropout=dropout, num_classes=num_classes)
