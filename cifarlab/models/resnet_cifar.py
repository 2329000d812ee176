"""CIFAR ResNets of He et al. 2016 (arXiv:1512.03385, section 4.2), optionally with stochastic depth.

depth = 6n + 2: a 3x3 conv with 16 channels, three stages of n BasicBlocks with 16, 32 and 64
channels (strides 1, 2, 2), global average pool, fc. Shortcuts are parameter-free "option A":
when the shape changes, the input is subsampled by 2 and zero-padded with extra channels.
ResNet-20 has 0.27M parameters.

Stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth", arXiv:1603.09382):
block l of L survives with probability p_l = 1 - (l / L) * (1 - 0.5), the paper's linear decay
to 0.5; one coin per block per batch, as in the paper. See `BasicBlock`.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from cifarlab.errors import ConfigError
from cifarlab.models.layers import BasicBlock, CifarModel, check_int, he_init_, make_conv
from cifarlab.models.registry import register_model

FINAL_SURVIVAL_PROB = 0.5  # p_L of Huang et al. 2016


class PadShortcut(nn.Module):
    """Option A shortcut: keep every other pixel, zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::2, ::2]
        half = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))


class CifarResNet(CifarModel):
    """conv3x3(16) - BN - ReLU, 3 stages x n BasicBlocks (16, 32, 64 channels), pool, fc."""

    def __init__(self, *, depth: int, stochastic_depth: bool, num_classes: int) -> None:
        super().__init__()
        n = (depth - 2) // 6
        num_blocks = 3 * n
        probs = [1 - block / num_blocks * (1 - FINAL_SURVIVAL_PROB) if stochastic_depth else 1.0
                 for block in range(1, num_blocks + 1)]  # survival probability of block l = 1..L
        self.conv1 = make_conv(3, 16, 3)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(16, 16, survival_probs=probs[:n])
        self.layer2 = _stage(16, 32, survival_probs=probs[n:2 * n])
        self.layer3 = _stage(32, 64, survival_probs=probs[2 * n:])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        he_init_(self)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.avgpool(x).flatten(1)  # (B, 64)


def _stage(in_ch: int, out_ch: int, *, survival_probs: list[float]) -> nn.Sequential:
    stride, shortcut = (2, PadShortcut(out_ch - in_ch)) if out_ch != in_ch else (1, None)
    blocks = [BasicBlock(in_ch, out_ch, stride=stride, downsample=shortcut, survival_prob=survival_probs[0])]
    blocks += [BasicBlock(out_ch, out_ch, survival_prob=p) for p in survival_probs[1:]]
    return nn.Sequential(*blocks)


@register_model
def resnet(*, num_classes: int = 10, depth: int = 20, stochastic_depth: bool = False) -> CifarResNet:
    """CIFAR ResNet of He et al. 2016 (depth 6n+2, 16-32-64 channels), optional stochastic depth."""
    if (check_int(depth, name="resnet depth") - 2) % 6 or depth < 8:
        raise ConfigError(f"resnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, 110, ...); got {depth}")
    return CifarResNet(depth=depth, stochastic_depth=bool(stochastic_depth), num_classes=num_classes)
