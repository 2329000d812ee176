"""Plain baseline CNN: three conv5x5 (padding 2)-ReLU-maxpool stages, 64-64-128 channels, fc 1000.

The stage layout is that of Krizhevsky's cuda-convnet CIFAR-10 nets and Caffe's `cifar10_quick`
(https://github.com/BVLC/caffe/tree/master/examples/cifar10), widened; dropout after the
1000-unit layer follows Srivastava et al. 2014 (JMLR 15). `cnn_bn` adds BatchNorm after each conv
(Ioffe & Szegedy 2015, arXiv:1502.03167).
"""
from __future__ import annotations

from torch import Tensor, nn

from cifarlab.models.layers import CifarModel, check_dropout
from cifarlab.models.registry import register_model


class CNN(CifarModel):
    """[conv5x5 - (BN) - ReLU - maxpool2] x 3, fc 1000 - ReLU - dropout, fc."""

    def __init__(self, *, batch_norm: bool, dropout: float, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for in_ch, out_ch in ((3, 64), (64, 64), (64, 128)):
            layers.append(nn.Conv2d(in_ch, out_ch, 5, padding=2, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)  # a no-op at 32x32; lets other input sizes through
        self.fc1 = nn.Linear(128 * 4 * 4, 1000)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(check_dropout(dropout))
        self.fc = nn.Linear(1000, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(x)).flatten(1)  # (B, 2048)
        return self.dropout(self.relu(self.fc1(x)))  # (B, 1000)


@register_model
def cnn(*, num_classes: int = 10, dropout: float = 0.5) -> CNN:
    """Baseline CNN: 3x [conv5x5-ReLU-maxpool] 64-64-128, fc 1000, dropout."""
    return CNN(batch_norm=False, dropout=dropout, num_classes=num_classes)


@register_model
def cnn_bn(*, num_classes: int = 10, dropout: float = 0.5) -> CNN:
    """Baseline CNN with BatchNorm: 3x [conv5x5-BN-ReLU-maxpool] 64-64-128, fc 1000, dropout."""
    return CNN(batch_norm=True, dropout=dropout, num_classes=num_classes)
