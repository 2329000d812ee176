"""ScatterNet models for DP-SGD: a frozen scattering transform, GroupNorm, and a small head trained privately.

Tramer & Boneh 2021, "Differentially Private Learning Needs Better Features (or Much More Data)", ICLR 2021
(arXiv:2011.11660; code github.com/ftramer/Handcrafted-DP). On CIFAR-10 at epsilon 3 they reach 67.0% with a linear
model and 69.3% with a small CNN on ScatterNet features, against 59.2% for an end-to-end CNN: the features are fixed
without looking at the data, so DP-SGD only has to train a small model on good features.

The scattering transform (Mallat 2012; Bruna & Mallat 2013, arXiv:1203.1513; Oyallon & Mallat 2015,
arXiv:1412.8659) with J=2 scales and L=8 angles maps each colour channel of a 32x32 image to 81 maps of 8x8: one
low-pass average, 16 first-order |x * psi_{j,theta}| and 64 second-order ||x * psi_{0,theta}| * psi_{1,theta'}|
coefficients, each averaged by a Gaussian low-pass phi and subsampled by 2^J. Filters, padding and ordering are
Kymatio's (Andreux et al. 2020, JMLR 21(60), the library Tramer & Boneh used), so the coefficients equal
`kymatio`'s Scattering2D up to float rounding; tests/test_scatter.py checks that where kymatio is installed (the
`test` extra). It is written here rather than imported because kymatio 0.3's `kymatio.torch` fails to import with
scipy >= 1.17 (`scipy.special.sph_harm` was removed) and because, with no augmentation to share the cost, the
transform of every training batch is what a run spends its time on: this version is 1.5x faster than kymatio's on
the 2-core CPU (see CHUNK): filtering and subsampling are fused into one pass over the spectrum, and the separable
Gaussian low-pass is two small matmuls instead of two FFTs.

Models (T&B's layouts; inputs are images in [0, 1], i.e. `data.preprocess: none`: a normalisation fitted on the
private training images would leak outside DP-SGD; like T&B's code the models centre the images with the ImageNet
mean and std, public constants):
- `scatter_linear`: scattering -> GroupNorm(27 groups, no affine) -> linear (155,530 parameters);
- `scatter_cnn`: scattering -> GroupNorm -> conv3x3 64 -> tanh -> maxpool 2 -> conv3x3 64 -> tanh -> linear
  (187,210 parameters).
GroupNorm normalises each example on its own, so unlike a normalisation with dataset statistics it costs no privacy.
`data_norm=True` adds, after it, data normalisation (`DataNorm`, T&B's other normalisation, there used instead of
GroupNorm): every channel is standardised with its mean and variance over the training set, fitted once before
training; DP runs fit them with a Gaussian mechanism whose cost the accountant adds (cifarlab.privacy.datanorm),
other runs exactly. It comes after GroupNorm, not instead of it, because the raw scattering channels differ in
scale by up to 1,000x (variances 1e-5 to 4e-3 on the JPEG copy): noise large enough to hide one example would
swamp the small channels' statistics, while after GroupNorm every channel is of order 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cifarlab.errors import ConfigError
from cifarlab.models.layers import CifarModel, check_int
from cifarlab.models.registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Images per internal chunk of the transform: large enough for two threads to share each op, small enough that the
# intermediates ((3 * chunk) x 64 maps of 20x20 complex values at order 2) stay near the caches. On the 2-core CPU
# (2 threads): chunks of 16, 32, 64 scatter 676, 793, 704 images/s; kymatio 0.3 (batches of 256) 513.
CHUNK = 32


# --- filter bank -------------------------------------------------------------------------------------------------


def _periodized_grid(size: int) -> Tensor:
    """Coordinates 0..size-1 shifted by -2..2 periods: summing a function over the first axis periodizes it."""
    return torch.arange(-2 * size, 3 * size, dtype=torch.float64).view(5, size)


def _gabor(size: int, *, sigma: float, theta: float, xi: float, slant: float) -> Tensor:
    """Periodized 2-D Gabor filter in space, (size, size) complex128: a Gaussian envelope with standard deviation
    sigma along direction theta and sigma / slant across it, times the plane wave exp(i xi <u, (cos, sin)(theta)>)."""
    c, s = math.cos(theta), math.sin(theta)
    rotation = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    precision = rotation @ torch.diag(torch.tensor([1.0, slant**2], dtype=torch.float64)) @ rotation.T / (2 * sigma**2)
    grid = _periodized_grid(size).flatten()
    u, v = torch.meshgrid(grid, grid, indexing="ij")  # (5 size, 5 size)
    envelope = -(precision[0, 0] * u**2 + 2 * precision[0, 1] * u * v + precision[1, 1] * v**2)
    values = torch.exp(torch.complex(envelope, xi * (c * u + s * v)))
    return values.view(5, size, 5, size).sum((0, 2)) / (2 * math.pi * sigma**2 / slant)


def morlet_fourier(size: int, *, sigma: float, theta: float, xi: float, slant: float) -> Tensor:
    """A Morlet wavelet's DFT on a (size, size) periodic grid, real (size, size) float64.

    Morlet = Gabor minus its envelope scaled to cancel the mean, so the wavelet has exactly zero mean (a constant image
    gives zero response). psi(-u) = conj(psi(u)), so the DFT is real."""
    wave = _gabor(size, sigma=sigma, theta=theta, xi=xi, slant=slant)
    envelope = _gabor(size, sigma=sigma, theta=theta, xi=0.0, slant=slant)
    return torch.fft.fft2(wave - wave.sum() / envelope.sum() * envelope).real


def _low_frequencies(size: int, kept: int) -> Tensor:
    """Indices of the `kept` lowest DFT frequencies of a length-`size` signal: the spectrum of a band-limited filter
    on a grid subsampled by size / kept."""
    return torch.cat([torch.arange(kept // 2), torch.arange(size - kept // 2, size)])


def _alias_blocks(filters: Tensor, k: int) -> Tensor:
    """(F, m, m) Fourier filters -> (k*k, F, m/k, m/k, 1), divided by k*k: block b holds the frequencies that alias
    onto the grid subsampled by k (subsampling by k in space averages them in Fourier)."""
    count, m, _ = filters.shape
    blocks = filters.reshape(count, k, m // k, k, m // k).permute(1, 3, 0, 2, 4)  # (k, k, F, m/k, m/k)
    return blocks.reshape(k * k, count, m // k, m // k, 1) / (k * k)


def _lowpass_matrix(padded: int, *, J: int, res: int, out: int) -> Tensor:
    """(out, padded / 2^res): the Gaussian low-pass phi (sigma 0.8 * 2^(J-1)) as a circulant on the grid at
    resolution `res`, keeping every 2^(J-res)-th output and dropping the two border samples that lie in the padding.

    phi is separable, so the 2-D low-pass-and-subsample of a map U is A U A^T."""
    sigma = 0.8 * 2 ** (J - 1)
    gauss = torch.exp(-_periodized_grid(padded) ** 2 / (2 * sigma**2)).sum(0) / math.sqrt(2 * math.pi * sigma**2)
    m = padded >> res
    kernel = torch.fft.ifft(torch.fft.fft(gauss).real[_low_frequencies(padded, m)]).real  # phi on the coarser grid
    rows = torch.arange(1, out + 1) * 2 ** (J - res)
    return kernel[(rows[:, None] - torch.arange(m)[None, :]) % m]


# --- the transform -----------------------------------------------------------------------------------------------


def _modulus(z: Tensor) -> Tensor:
    parts = torch.view_as_real(z)
    return (parts[..., 0].square() + parts[..., 1].square()).sqrt_()  # 2x faster than z.abs() on CPU


def _wavelet_modulus(u_hat: Tensor, blocks: Tensor, k: int) -> Tensor:
    """|u * psi| subsampled by k for every map and filter: u_hat (n, c, m, m) complex DFTs, blocks from
    `_alias_blocks` for L filters -> (n, c, L, m/k, m/k) real.

    Filtering and subsampling in one pass: the k*k frequency blocks are multiplied by their filter blocks and summed
    into the coarse spectrum, so no (n, c, L, m, m) product is formed (the filters are real: real and imaginary parts
    are scaled alike)."""
    n, c, m, _ = u_hat.shape
    coarse = m // k
    parts = torch.view_as_real(u_hat).view(n, c, k, coarse, k, coarse, 2).permute(2, 4, 0, 1, 3, 5, 6)
    parts = parts.reshape(k * k, n, c, 1, coarse, coarse, 2)
    spectrum = parts[0] * blocks[0]  # (n, c, L, coarse, coarse, 2)
    for b in range(1, k * k):
        spectrum.addcmul_(parts[b], blocks[b])
    return _modulus(torch.fft.ifft2(torch.view_as_complex(spectrum)))


class Scattering2D(nn.Module):
    """Frozen 2-layer scattering of square images: (B, C, N, N) -> (B, C * K, N / 2^J, N / 2^J), K = 1 + J L +
    L^2 J (J - 1) / 2 coefficients per input channel in Kymatio's order: order 0, order 1 by (j1, theta1), order 2 by
    (j1, theta1, j2, theta2). Images are reflect-padded by 2^J on each side first, as Kymatio does.

    No parameters and no gradient (forward runs under no_grad): it is a fixed feature map, and the DP fast clipping
    path marks its input as requiring grad, which would otherwise make autograd record the whole transform. The
    filters are non-persistent buffers: a pure function of (size, J, L), which the model's arguments record.
    """

    # Read by the exporter (cifarlab.export): a traced graph of this layer would not be a faithful copy.
    export_refusal = ("computes complex-valued FFTs, which ONNX has no type for, and splits batches into chunks of "
                      f"{CHUNK} in Python, which a TorchScript trace would fix to the example's batch size")

    def __init__(self, size: int, *, J: int = 2, L: int = 8) -> None:
        super().__init__()
        check_int(J, name="scattering J")
        check_int(L, name="scattering L")
        check_int(size, name="image size")
        if size % 2**J or size <= 2**J:
            raise ConfigError(f"scattering with J={J} needs an image size that is a multiple of 2^J={2**J} and above "
                              f"it (the reflect padding is 2^J wide); got {size}")
        self.size, self.J, self.L = size, J, L
        self.channels_per_input = 1 + J * L + L * L * J * (J - 1) // 2
        padded, out = size + 2 ** (J + 1), size // 2**J
        psi = torch.stack([
            torch.stack([morlet_fourier(padded, sigma=0.8 * 2**j, theta=(L // 2 - 1 - t) * math.pi / L,
                                        xi=0.75 * math.pi / 2**j, slant=4 / L) for t in range(L)])
            for j in range(J)
        ])  # (J, L, padded, padded): Kymatio's scales, angles and aspect ratio
        for res in range(J):
            self.register_buffer(f"lowpass{res}", _lowpass_matrix(padded, J=J, res=res, out=out).float(),
                                 persistent=False)
        for j1 in range(J):  # first order: filter at full resolution, subsample to 2^j1
            self.register_buffer(f"wave{j1}", _alias_blocks(psi[j1], 2**j1).float(), persistent=False)
            for j2 in range(j1 + 1, J):  # second order: filter psi_j2 on the grid of U_j1, subsample to 2^j2
                low = _low_frequencies(padded, padded >> j1)
                filters = psi[j2][:, low][:, :, low]
                self.register_buffer(f"wave{j1}_{j2}", _alias_blocks(filters, 2 ** (j2 - j1)).float(),
                                     persistent=False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-2:] != (self.size, self.size):
            raise ConfigError(f"the scattering was built for (B, C, {self.size}, {self.size}) images; got "
                              f"{tuple(x.shape)} (set the model's image_size to the data's input size)")
        with torch.autocast(x.device.type, enabled=False):  # FFTs and small sums in fp32 even under bf16 autocast
            return torch.cat([self._scatter(chunk) for chunk in x.float().split(CHUNK)])

    def _lowpass(self, u: Tensor, res: int) -> Tensor:
        a = getattr(self, f"lowpass{res}")  # (out, m)
        return ((u @ a.T).transpose(-1, -2) @ a.T).transpose(-1, -2)  # A U A^T = ((U A^T)^T A^T)^T

    def _scatter(self, x: Tensor) -> Tensor:
        batch, channels, size, _ = x.shape
        J, pad = self.J, 2**self.J
        x = F.pad(x.reshape(batch * channels, 1, size, size), (pad, pad, pad, pad), mode="reflect")  # (n, 1, M, M)
        x_hat = torch.fft.fft2(x)
        coefficients = [self._lowpass(x, 0)]  # (n, 1, out, out)
        first_hat = {}
        for j1 in range(J):
            first = _wavelet_modulus(x_hat, getattr(self, f"wave{j1}"), 2**j1)[:, 0]  # (n, L, M / 2^j1, ...)
            coefficients.append(self._lowpass(first, j1))
            if j1 < J - 1:
                first_hat[j1] = torch.fft.fft2(first)
        for j1, u_hat in first_hat.items():
            second = [self._lowpass(_wavelet_modulus(u_hat, getattr(self, f"wave{j1}_{j2}"), 2 ** (j2 - j1)), j2)
                      for j2 in range(j1 + 1, J)]  # each (n, L, L, out, out)
            coefficients.append(torch.stack(second, 2).flatten(1, 3))  # (j1, theta1, j2, theta2) order
        out = torch.cat(coefficients, 1)  # (n, K, out, out)
        return out.reshape(batch, channels * self.channels_per_input, *out.shape[-2:])


# --- models ------------------------------------------------------------------------------------------------------


DATA_NORM_EPS = 1e-5  # added to the variances, as BatchNorm does


class DataNorm(nn.Module):
    """Per-channel standardisation with statistics of the whole training set, fitted once and then fixed.

    `moments(x)` gives each example's per-channel mean and mean square (its contribution to the statistics, which
    DP bounds and noises); `set_moments` takes their average over the training set.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.ones(channels))
        self.register_buffer("fitted", torch.tensor(False))  # saved with the weights: a loaded model is fitted
        # Reading `fitted` on a GPU waits for every queued kernel, so forward reads it only until it has seen True;
        # loading weights (which may be unfitted ones) makes it look again.
        self._seen_fitted = False
        self.register_load_state_dict_post_hook(DataNorm._look_again)

    @staticmethod
    def _look_again(module: DataNorm, incompatible_keys: object) -> None:
        module._seen_fitted = False

    @staticmethod
    def moments(x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, 2C): per example, every channel's spatial mean, then every channel's mean square."""
        return torch.cat([x.mean((2, 3)), x.square().mean((2, 3))], 1)

    @torch.no_grad()
    def set_moments(self, average: Tensor) -> None:
        """Fit from the (2C,) average of `moments` over the training set (possibly noisy, so variances are clamped)."""
        mean, mean_square = average.float().to(self.mean.device).chunk(2)
        self.mean.copy_(mean)
        self.var.copy_((mean_square - mean.square()).clamp_min(0))
        self.fitted.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        if not self._seen_fitted:
            if not self.fitted:
                raise RuntimeError("DataNorm used before its statistics were fitted: train the model with cifarlab "
                                   "(which fits them), or call set_moments")
            self._seen_fitted = True
        return (x - self.mean[:, None, None]) * (self.var[:, None, None] + DATA_NORM_EPS).rsqrt()


def unfitted_data_norm(model: nn.Module) -> bool:
    """Whether `model` has DataNorm statistics still to fit."""
    return any(isinstance(module, DataNorm) and not module.fitted for module in model.modules())


class ScatterNet(CifarModel):
    """Fixed centring -> Scattering2D(J=2, L=8) -> GroupNorm without affine (-> DataNorm) -> head -> fc."""

    def __init__(self, *, head: str, groups: int, data_norm: bool, image_size: int, num_classes: int) -> None:
        super().__init__()
        if not isinstance(data_norm, bool):
            raise ConfigError(f"scatter: data_norm must be true or false, got {data_norm!r}")
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.scattering = Scattering2D(image_size, J=2, L=8)
        channels, side = 3 * self.scattering.channels_per_input, image_size // 4
        check_int(groups, name="groups")
        if channels % groups:
            raise ConfigError(f"GroupNorm: groups={groups} must divide the {channels} scattering channels "
                              "(e.g. 9, 27 or 81; 27 keeps each group within one colour and one order)")
        self.channels = channels
        self.norm = nn.GroupNorm(groups, channels, affine=False)
        self.data_norm = DataNorm(channels) if data_norm else None  # fitted to the frozen prefix's outputs
        if head == "linear":
            self.body: nn.Module = nn.Identity()
            features = channels * side * side
        else:
            if side % 2:
                raise ConfigError(f"scatter_cnn max-pools the {side}x{side} scattering maps by 2; image_size must be "
                                  f"a multiple of 8, got {image_size}")
            self.body = nn.Sequential(nn.Conv2d(channels, 64, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                                      nn.Conv2d(64, 64, 3, padding=1), nn.Tanh())
            features = 64 * (side // 2) ** 2
        self.fc = nn.Linear(features, num_classes)

    @torch.no_grad()
    def frozen_prefix(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> normalised scattering (B, 243, H/4, W/4): everything before the trained layers
        that is a fixed function of each image alone, so a run without augmentation computes it once per image
        (train.run.precompute_frozen_prefix) instead of once per epoch."""
        return self.norm(self.scattering((x - self.mean) / self.std))

    def prefix(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W), or their `frozen_prefix` (B, 243, H/4, W/4), told apart by the channel count ->
        the frozen prefix."""
        return x if x.shape[1] == self.channels else self.frozen_prefix(x)

    def forward_features(self, x: Tensor) -> Tensor:
        s = self.prefix(x)
        return self.body(s if self.data_norm is None else self.data_norm(s)).flatten(1)


@register_model
def scatter_linear(*, num_classes: int = 10, groups: int = 27, data_norm: bool = False,
                   image_size: int = 32) -> ScatterNet:
    """ScatterNet (J=2, L=8, frozen) + GroupNorm (+ data norm) + linear, Tramer & Boneh 2021 (155,530 params)."""
    return ScatterNet(head="linear", groups=groups, data_norm=data_norm, image_size=image_size,
                      num_classes=num_classes)


@register_model
def scatter_cnn(*, num_classes: int = 10, groups: int = 27, data_norm: bool = False,
                image_size: int = 32) -> ScatterNet:
    """ScatterNet (J=2, L=8, frozen) + GroupNorm (+ data norm) + CNN 64-M-64 (tanh), Tramer & Boneh 2021
    (187,210 params)."""
    return ScatterNet(head="cnn", groups=groups, data_norm=data_norm, image_size=image_size, num_classes=num_classes)
