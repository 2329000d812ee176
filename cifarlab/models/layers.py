"""Building blocks shared by the model families: base class, norm factory, WS conv, residual blocks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cifarlab.errors import ConfigError

NORMS = ("batch", "group")


class CifarModel(nn.Module):
    """Base of every native model: `forward(x) = get_classifier()(forward_features(x))`.

    Subclasses implement `forward_features` (B, 3, H, W) -> (B, D) and name their last layer `fc`.
    """

    fc: nn.Linear

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def forward(self, x: Tensor) -> Tensor:
        return self.get_classifier()(self.forward_features(x))


def check_int(value: int, *, name: str, minimum: int = 1) -> int:
    """`value` if it is an integer >= `minimum`, else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


def check_dropout(p: float, *, name: str = "dropout") -> float:
    """`p` if it is a valid dropout probability, else ConfigError."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ConfigError(f"{name} must be a probability in [0, 1); got {p!r}")
    return float(p)


def make_norm(kind: str, channels: int, *, groups: int = 16) -> nn.Module:
    """BatchNorm2d ("batch") or GroupNorm with `groups` groups ("group"; Wu & He 2018, DP-friendly)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        if channels % groups:
            raise ConfigError(f"GroupNorm: groups={groups} must divide every layer's channels; "
                              f"{channels} channels is not divisible")
        return nn.GroupNorm(groups, channels)
    raise ConfigError(f"unknown norm {kind!r}; valid: {', '.join(NORMS)}")


class WSConv2d(nn.Conv2d):
    """Conv2d with Weight Standardization (Qiao et al. 2019, arXiv:1903.10520).

    Each output channel's weight is standardised to zero mean, unit variance over (in, kh, kw) in
    every forward. De et al. 2022 (arXiv:2204.13650) use it with GroupNorm for DP-SGD WRNs.
    """

    eps: float = 1e-5

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        w = (w - mean) * torch.rsqrt(var + self.eps)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def make_conv(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1,
              weight_standardization: bool = False) -> nn.Conv2d:
    """Bias-free conv with 'same' padding (the norm that follows makes a bias redundant)."""
    conv = WSConv2d if weight_standardization else nn.Conv2d
    return conv(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)


def he_init_(model: nn.Module) -> None:
    """He-normal (fan_out) init of every conv, as torchvision's ResNets do (He et al. 2015)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


class BasicBlock(nn.Module):
    """Post-activation residual block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)) (He et al. 2016).

    Attribute names follow torchvision (conv1, bn1, conv2, bn2, downsample) so its state_dicts load.
    `survival_prob` < 1 enables stochastic depth (Huang et al. 2016, arXiv:1603.09382): in training
    the residual branch of the whole batch is dropped with probability 1 - p; at test time the
    branch is scaled by p, its expected value in training.
    """

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, downsample: nn.Module | None = None,
                 survival_prob: float = 1.0) -> None:
        super().__init__()
        self.conv1 = make_conv(in_ch, out_ch, 3, stride=stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = make_conv(out_ch, out_ch, 3)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = downsample
        self.survival_prob = survival_prob

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        if self.training and self.survival_prob < 1.0 and torch.rand(()).item() >= self.survival_prob:
            return F.relu(identity)  # not in place: identity may be the block's input
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if not self.training:
            out = out * self.survival_prob
        return self.relu(out + identity)


class PreActBlock(nn.Module):
    """Pre-activation block: conv(drop(relu(norm(conv(relu(norm(x))))))) + shortcut.

    He et al. 2016, "Identity Mappings in Deep Residual Networks" (arXiv:1603.05027); with dropout
    between the convs it is the Wide ResNet block (Zagoruyko & Komodakis 2016). A 1x1 projection
    shortcut, used when the shape changes, reads the pre-activated input as in both papers' code.
    """

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, dropout: float = 0.0, norm: str = "batch",
                 groups: int = 16, weight_standardization: bool = False) -> None:
        super().__init__()
        ws = weight_standardization
        self.norm1 = make_norm(norm, in_ch, groups=groups)
        self.conv1 = make_conv(in_ch, out_ch, 3, stride=stride, weight_standardization=ws)
        self.norm2 = make_norm(norm, out_ch, groups=groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = make_conv(out_ch, out_ch, 3, weight_standardization=ws)
        self.shortcut = (make_conv(in_ch, out_ch, 1, stride=stride, weight_standardization=ws)
                         if stride != 1 or in_ch != out_ch else None)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.norm2(out))))
        return out + shortcut
