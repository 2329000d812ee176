"""ResNet-18 (He et al. 2016, "Deep Residual Learning for Image Recognition", arXiv:1512.03385).

`resnet18` is torchvision's `torchvision.models.resnet18` layer for layer: same module names,
parameter and buffer shapes and init, so a torchvision state_dict loads with strict=True.
`resnet18_cifar` swaps the ImageNet stem (7x7 stride-2 conv + maxpool) for a 3x3 stride-1 conv,
the usual CIFAR adaptation (e.g. github.com/kuangliu/pytorch-cifar): 11,173,962 params for 10 classes.
"""
from __future__ import annotations

from torch import Tensor, nn

from cifarlab.models.layers import BasicBlock, CifarModel, he_init_, make_conv
from cifarlab.models.registry import register_model


class ResNet(CifarModel):
    """Stem, four stages of two BasicBlocks (64-128-256-512 channels), global average pool, fc."""

    def __init__(self, *, cifar_stem: bool, zero_init_residual: bool, num_classes: int) -> None:
        super().__init__()
        if cifar_stem:
            self.conv1 = make_conv(3, 64, 3)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = make_conv(3, 64, 7, stride=2)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(64, 64, stride=1)
        self.layer2 = _stage(64, 128, stride=2)
        self.layer3 = _stage(128, 256, stride=2)
        self.layer4 = _stage(256, 512, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        he_init_(self)
        if zero_init_residual:  # each block starts as the identity (Goyal et al. 2017, arXiv:1706.02677)
            for block in self.modules():
                if isinstance(block, BasicBlock):
                    nn.init.zeros_(block.bn2.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)  # (B, 512)


def _stage(in_ch: int, out_ch: int, *, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or in_ch != out_ch:
        downsample = nn.Sequential(make_conv(in_ch, out_ch, 1, stride=stride), nn.BatchNorm2d(out_ch))
    return nn.Sequential(BasicBlock(in_ch, out_ch, stride=stride, downsample=downsample),
                         BasicBlock(out_ch, out_ch))


@register_model
def resnet18(*, num_classes: int = 10, zero_init_residual: bool = False) -> ResNet:
    """ResNet-18 exactly as torchvision (7x7 stride-2 stem + maxpool); its state_dicts load."""
    return ResNet(cifar_stem=False, zero_init_residual=zero_init_residual, num_classes=num_classes)


@register_model
def resnet18_cifar(*, num_classes: int = 10, zero_init_residual: bool = False) -> ResNet:
    """ResNet-18 with a CIFAR stem (3x3 stride-1 conv, no maxpool)."""
    return ResNet(cifar_stem=True, zero_init_residual=zero_init_residual, num_classes=num_classes)
