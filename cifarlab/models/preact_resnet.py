"""Pre-activation ResNet-18 (He et al. 2016, "Identity Mappings in Deep Residual Networks",
arXiv:1603.05027) with the CIFAR stem (3x3 stride-1 conv, no maxpool).

Four stages of two PreActBlocks (64-128-256-512 channels, strides 1, 2, 2, 2), then the final
BN-ReLU that pre-activation nets need before pooling (the paper's design; some popular CIFAR
ports such as kuangliu/pytorch-cifar omit it).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from cifarlab.models.layers import CifarModel, PreActBlock, he_init_, make_conv
from cifarlab.models.registry import register_model


class PreActResNet(CifarModel):
    """conv3x3(64), 4 stages x 2 PreActBlocks, BN-ReLU, global average pool, fc."""

    def __init__(self, *, num_classes: int) -> None:
        super().__init__()
        self.conv1 = make_conv(3, 64, 3)
        self.layer1 = _stage(64, 64, stride=1)
        self.layer2 = _stage(64, 128, stride=2)
        self.layer3 = _stage(128, 256, stride=2)
        self.layer4 = _stage(256, 512, stride=2)
        self.bn = nn.BatchNorm2d(512)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        he_init_(self)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(F.relu(self.bn(x))).flatten(1)  # (B, 512)


def _stage(in_ch: int, out_ch: int, *, stride: int) -> nn.Sequential:
    return nn.Sequential(PreActBlock(in_ch, out_ch, stride=stride), PreActBlock(out_ch, out_ch))


@register_model
def preact_resnet18(*, num_classes: int = 10) -> PreActResNet:
    """Pre-activation ResNet-18 (He et al. 2016 identity mappings) with a CIFAR stem."""
    return PreActResNet(num_classes=num_classes)
