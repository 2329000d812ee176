"""Wide Residual Networks (Zagoruyko & Komodakis 2016, arXiv:1605.07146).

WRN-depth-width: a 3x3 conv with 16 channels, three stages of n = (depth - 4) / 6 pre-activation
blocks with 16*width, 32*width, 64*width channels (strides 1, 2, 2), norm-ReLU, global average
pool, fc. Dropout sits between the two convs of a block. WRN-16-4 has ~2.75M parameters,
WRN-28-10 ~36.5M.

For DP-SGD, De et al. 2022 ("Unlocking High-Accuracy Differentially Private Image Classification
through Scale", arXiv:2204.13650) use GroupNorm (`norm="group"`, 16 groups) and Weight
Standardization on every conv (`weight_standardization=True`, Qiao et al. 2019).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from cifarlab.errors import ConfigError
from cifarlab.models.layers import (CifarModel, PreActBlock, check_dropout, check_int, he_init_, make_conv,
                                    make_norm)
from cifarlab.models.registry import register_model


class WideResNet(CifarModel):
    """conv3x3(16), 3 stages x n PreActBlocks (16k, 32k, 64k channels), norm-ReLU, pool, fc."""

    def __init__(self, *, depth: int, width: int, dropout: float, norm: str, groups: int,
                 weight_standardization: bool, num_classes: int) -> None:
        super().__init__()
        n = (depth - 4) // 6
        block_args = dict(dropout=dropout, norm=norm, groups=groups,
                          weight_standardization=weight_standardization)
        self.conv1 = make_conv(3, 16, 3, weight_standardization=weight_standardization)
        stages = []
        in_ch = 16
        for out_ch, stride in ((16 * width, 1), (32 * width, 2), (64 * width, 2)):
            blocks = [PreActBlock(in_ch, out_ch, stride=stride, **block_args)]
            blocks += [PreActBlock(out_ch, out_ch, **block_args) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3 = stages
        self.norm = make_norm(norm, in_ch, groups=groups)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        he_init_(self)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.avgpool(F.relu(self.norm(x))).flatten(1)  # (B, 64 * width)


@register_model
def wrn(*, num_classes: int = 10, depth: int = 16, width: int = 4, dropout: float = 0.0, norm: str = "batch",
        groups: int = 16, weight_standardization: bool = False) -> WideResNet:
    """Wide ResNet WRN-depth-width (Zagoruyko & Komodakis 2016); GroupNorm + WS option for DP."""
    if (check_int(depth, name="wrn depth") - 4) % 6 or depth < 10:
        raise ConfigError(f"wrn depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...); got {depth}")
    width, groups = check_int(width, name="wrn width"), check_int(groups, name="wrn groups")
    return WideResNet(depth=depth, width=width, dropout=check_dropout(dropout), norm=norm, groups=groups,
                      weight_standardization=bool(weight_standardization), num_classes=num_classes)
