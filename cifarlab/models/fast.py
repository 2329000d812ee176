"""`fast`: a small VGG-like network for time-to-accuracy, after the ideas of airbench (Jordan 2024, arXiv:2404.00498).

Written from the paper's ideas, not its code:
- a frozen first layer that whitens 2x2 patches: its filters are the eigenvectors of the training images' patch
  covariance divided by sqrt(eigenvalue + eps), each next to its negative so the GELU after it passes both signs.
  The training run calls `init_from_data` once with a few thousand normalised training images; until then the
  layer holds the data-free identity whitening (it copies pixels);
- three blocks conv3x3 -> maxpool -> BN -> GELU (-> conv3x3 -> BN -> GELU ...), global max pool, a linear head
  fed with down-scaled features (small initial logits, which label smoothing and high learning rates like);
- lookahead (Zhang et al. 2019, arXiv:1907.08610) kept inside the model, like BatchNorm's running statistics, so
  the one training engine needs no special case: every `lookahead_every` training forwards the weights move to a
  slow copy that trails them;
- `activation`: GELU (default) or SiLU after every BatchNorm and after the whitening;
- optionally (`identity_init`) each conv starts as a partial identity, as airbench's do: its first min(in, out)
  filters copy their input channel (a Dirac kernel), the others keep the default random start;
- optional dropout on the pooled features (`dropout`, default 0), for MC dropout (cifarlab.uncertainty);
- test-time augmentation in eval mode: the features are averaged over flipped and 1-pixel-shifted views; the head
  is linear, so this is the mean of the views' logits and `forward(x) == fc(forward_features(x))` still holds.
Label smoothing, Nesterov SGD with warmup and decay, bf16, channels_last and torch.compile come from the recipes
(recipes/fast-*.yaml) through the ordinary engine.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cifarlab.errors import ConfigError
from cifarlab.models.layers import CifarModel, check_dropout
from cifarlab.models.registry import register_model

PATCH = 2
PATCH_DIM = 3 * PATCH * PATCH  # 12 values per RGB 2x2 patch
# Added to the eigenvalues before the 1/sqrt. On normalised CIFAR-10 (JPEG copy) the patch covariance has
# eigenvalues 10 down to 1e-4; the six smallest (< 6e-3: fine colour detail, much of it compression noise) would
# otherwise be amplified up to 100x.
WHITEN_EPS = 5e-3
# Running statistics follow the last few batches: short runs (a few hundred steps) would otherwise evaluate with
# statistics still close to their initial values.
BN_MOMENTUM = 0.6
FEATURE_SCALE = 1 / 9  # airbench's head scaling: the head starts with small logits
TTA_LEVELS = (0, 1, 2)  # none, + mirror, + mirror and 1-pixel shifts (6 views)
# name -> (module after each BatchNorm, function after the whitening). SiLU is one of the 2025 CIFAR-10 speedrun's
# changes, and cheaper than GELU's erf on a CPU.
ACTIVATIONS: dict[str, tuple[type[nn.Module], Callable[[Tensor], Tensor]]] = {
    "gelu": (nn.GELU, F.gelu), "silu": (nn.SiLU, F.silu)}


def _disable_compile_lazily(method: Callable) -> Callable:
    """`torch.compiler.disable(method)`, applied at the first call rather than at import: the decorator imports
    torch._dynamo (about a second of start-up on 2 CPU cores), which uses that never train, such as feature
    extraction in `cifarlab continual add`, do not need. Dynamo also honours a disable created while it traces."""
    disabled = None

    @functools.wraps(method)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(method)
        return disabled(*args, **kwargs)

    return call


def conv_bn_act(in_ch: int, out_ch: int, *, pool: bool, identity_init: bool, activation: str) -> list[nn.Module]:
    """conv3x3 (-> maxpool 2) -> BN -> GELU or SiLU; pooling before BN does the normalisation on 4x fewer values."""
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
    if identity_init:  # the first min(in, out) filters pass their input channel through; the rest stay random
        with torch.no_grad():
            nn.init.dirac_(conv.weight[:in_ch])
    return [conv, *([nn.MaxPool2d(2)] if pool else []), nn.BatchNorm2d(out_ch, momentum=BN_MOMENTUM),
            ACTIVATIONS[activation][0]()]


def tta_views(x: Tensor, level: int) -> list[Tensor]:
    """The batch itself, its mirror image (level >= 1), and both shifted by one pixel up-left and down-right (2)."""
    views = [x]
    if level >= 1:
        views.append(x.flip(-1))
    if level >= 2:
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        for shifted in (padded[..., :-2, :-2], padded[..., 2:, 2:]):
            views += [shifted, shifted.flip(-1)]
    return views


class FastNet(CifarModel):
    """Patch whitening (frozen) -> 3 conv blocks (each halves the resolution) -> global max pool -> linear."""

    def __init__(self, *, widths: tuple[int, int, int], convs_per_block: int, lookahead_every: int,
                 lookahead_alpha: float, tta: int, dropout: float, identity_init: bool, activation: str,
                 num_classes: int) -> None:
        super().__init__()
        if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ConfigError(f"fast: widths must be positive integers, got {widths}")
        if isinstance(convs_per_block, bool) or not isinstance(convs_per_block, int) or convs_per_block < 1:
            raise ConfigError(f"fast: convs_per_block must be an integer >= 1, got {convs_per_block!r}")
        if isinstance(lookahead_every, bool) or not isinstance(lookahead_every, int) or lookahead_every < 0:
            raise ConfigError(f"fast: lookahead_every must be an integer >= 0 (0: off), got {lookahead_every!r}")
        if not 0 < lookahead_alpha <= 1:
            raise ConfigError(f"fast: lookahead_alpha must be in (0, 1], got {lookahead_alpha!r}")
        if tta not in TTA_LEVELS or isinstance(tta, bool):
            raise ConfigError(f"fast: tta must be one of {TTA_LEVELS} (none, mirror, mirror + shifts), got {tta!r}")
        if not isinstance(identity_init, bool):
            raise ConfigError(f"fast: identity_init must be true or false, got {identity_init!r}")
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ConfigError(f"fast: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        self.tta = tta
        self.whiten_activation = ACTIVATIONS[activation][1]  # a function, not a module: no new layer name
        self.lookahead_every = lookahead_every
        self.lookahead_alpha = float(lookahead_alpha)
        # Buffers, not parameters: the whitening is fitted to the data, never trained.
        self.register_buffer("whiten_weight", torch.zeros(2 * PATCH_DIM, 3, PATCH, PATCH))
        self.register_buffer("whiten_bias", torch.zeros(2 * PATCH_DIM))
        self.set_whitening(torch.eye(PATCH_DIM, dtype=torch.float64), torch.zeros(PATCH_DIM, dtype=torch.float64))
        layers: list[nn.Module] = []
        in_ch = 2 * PATCH_DIM
        for width in widths:
            layers += conv_bn_act(in_ch, width, pool=True, identity_init=identity_init, activation=activation)
            for _ in range(convs_per_block - 1):
                layers += conv_bn_act(width, width, pool=False, identity_init=identity_init, activation=activation)
            in_ch = width
        self.blocks = nn.Sequential(*layers)
        self.dropout = nn.Dropout(check_dropout(dropout, name="fast: dropout"))
        self.fc = nn.Linear(in_ch, num_classes)
        self.lookahead_steps = 0  # a Python int, so counting costs no device sync; saved by get_extra_state
        if lookahead_every:
            for i, param in enumerate(self.parameters()):
                self.register_buffer(f"lookahead_slow_{i}", param.detach().clone())

    @torch.no_grad()
    def init_from_data(self, images: Tensor) -> None:
        """Fit the whitening layer to normalised training images (N, 3, H, W); a few thousand are plenty."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"init_from_data expects float images (N, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        total, outer, count = torch.zeros(PATCH_DIM, dtype=torch.float64), 0.0, 0
        for chunk in images.split(512):
            patches = F.unfold(chunk.float(), PATCH).transpose(0, 1).reshape(PATCH_DIM, -1)  # (12, n * L)
            # float32 products on the images' device (fast), sums of the chunks in float64
            total = total + patches.sum(1).double().cpu()
            outer = outer + (patches @ patches.T).double().cpu()
            count += patches.shape[1]
        mean = total / count
        self.set_whitening(outer / count - torch.outer(mean, mean), mean)

    @torch.no_grad()
    def set_whitening(self, covariance: Tensor, mean: Tensor) -> None:
        """Whitening filters from a (12, 12) patch covariance (flattened as C, kh, kw) and a (12,) patch mean."""
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        filters = eigenvectors.T / (eigenvalues.clamp_min(0) + WHITEN_EPS).sqrt()[:, None]  # (12, 12), one per row
        filters = torch.cat([filters, -filters])  # (24, 12)
        self.whiten_weight.copy_(filters.reshape(self.whiten_weight.shape))
        self.whiten_bias.copy_(-filters @ mean.double())  # centres every output on the data

    def _features(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.whiten_weight.to(x.dtype), self.whiten_bias.to(x.dtype))  # (B, 24, H-1, W-1)
        x = self.blocks(self.whiten_activation(x))  # (B, width3, H/8, W/8) roughly
        return F.adaptive_max_pool2d(x, 1).flatten(1) * FEATURE_SCALE  # (B, width3)

    def forward_features(self, x: Tensor) -> Tensor:
        if self.training:
            if self.lookahead_every:
                self._lookahead_tick()
            return self.dropout(self._features(x))
        views = tta_views(x, self.tta)
        return self.dropout(sum(self._features(view) for view in views) / len(views))  # active only for MC dropout

    @_disable_compile_lazily  # in-place weight updates every k steps stay out of the compiled graph
    @torch.no_grad()
    def _lookahead_tick(self) -> None:
        """Called before every training forward, i.e. after every optimizer step (the first call: none yet)."""
        self.lookahead_steps += 1
        if self.lookahead_steps % self.lookahead_every:
            return
        for i, param in enumerate(self.parameters()):
            slow = getattr(self, f"lookahead_slow_{i}")
            slow.lerp_(param, self.lookahead_alpha)
            param.copy_(slow)

    def get_extra_state(self) -> Tensor:
        return torch.tensor(self.lookahead_steps)  # a tensor: checkpoints load with weights_only=True

    def set_extra_state(self, state: Tensor) -> None:
        self.lookahead_steps = int(state)


@register_model
def fast(*, num_classes: int = 10, width1: int = 64, width2: int = 256, width3: int = 256, convs_per_block: int = 2,
         lookahead_every: int = 5, lookahead_alpha: float = 0.5, tta: int = 2, dropout: float = 0.0,
         identity_init: bool = False, activation: str = "gelu") -> FastNet:
    """airbench-style net for fast training: frozen 2x2 patch whitening, 3 conv blocks, lookahead, flip+shift TTA."""
    return FastNet(widths=(width1, width2, width3), convs_per_block=convs_per_block, lookahead_every=lookahead_every,
                   lookahead_alpha=lookahead_alpha, tta=tta, dropout=dropout, identity_init=identity_init,
                   activation=activation, num_classes=num_classes)
