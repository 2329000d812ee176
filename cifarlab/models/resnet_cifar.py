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
from cifarlab.models.layers import BasicBlock, CifarModel, he_init_, make_conv
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
        self.conv1 = make_conv(3, 16, 3)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        blocks: list[nn.Module] = []
        in_ch = 16
        for out_ch in (16, 32, 64):
            for i in range(n):
                stride = 2 if out_ch != in_ch else 1
                index = len(blocks) + 1  # l in 1..L
                survival = 1 - index / num_blocks * (1 - FINAL_SURVIVAL_PROB) if stochastic_depth else 1.0
                shortcut = PadShortcut(out_ch - in_ch) if stride != 1 else None
                blocks.append(BasicBlock(in_ch, out_ch, stride=stride, downsample=shortcut, survival_prob=survival))
                in_ch = out_ch
        self.layer1, self.layer2, self.layer3 = (nn.Sequential(*blocks[i * n:(i + 1) * n]) for i in range(3))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        he_init_(self)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.avgpool(x).flatten(1)  # (B, 64)


@register_model
def resnet(*, num_classes: int = 10, depth: int = 20, stochastic_depth: bool = False) -> CifarResNet:
    """CIFAR ResNet of He et al. 2016 (depth 6n+2, 16-32-64 channels), optional stochastic depth."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"resnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...); got {depth!r}")
    return CifarResNet(depth=depth, stochastic_depth=bool(stochastic_depth), num_classes=num_classes)
