"""ScatterNet models (cifarlab.models.scatter): the scattering against kymatio and its defining properties, the
frozen transform under DP-SGD (only the head is trained; per-example clipping against a one-at-a-time reference)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cifarlab.data.loader import BatchLoader
from cifarlab.data.preprocess import fit_preprocessor
from cifarlab.data.sources import Split
from cifarlab.errors import ConfigError
from cifarlab.models import create_model
from cifarlab.models.scatter import Scattering2D, morlet_fourier
from cifarlab.privacy.clipping import clipped_grad_sum, trainable_parameters
from cifarlab.privacy.dpsgd import make_private, prepare_model


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("J, L, size", [(2, 8, 32), (3, 4, 32), (1, 3, 16)])
def test_matches_kymatio(J: int, L: int, size: int) -> None:
    # The library Tramer & Boneh used; its 2-D frontend imports even where `kymatio.torch` does not (scipy >= 1.17).
    frontend = pytest.importorskip("kymatio.scattering2d.frontend.torch_frontend")
    x = images(3, size)
    want = frontend.ScatteringTorch2D(J=J, shape=(size, size), L=L)(x).flatten(1, 2)  # (B, 3 * K, out, out)
    got = Scattering2D(size, J=J, L=L)(x)
    assert got.shape == want.shape == (3, 3 * (1 + J * L + L * L * J * (J - 1) // 2), size >> J, size >> J)
    # kymatio normalises its Gaussians with 3.1415 for pi: a relative difference of 3e-5 per filter, 1e-4 at order 2.
    scale = want.abs().amax((0, 2, 3), keepdim=True)  # per channel: order-2 coefficients are ~100x smaller
    assert ((got - want).abs() / scale).max() < 3e-4


def test_shapes_channels_and_no_parameters() -> None:
    scattering = Scattering2D(32)
    assert scattering.channels_per_input == 81  # 1 + 2*8 + 8*8
    assert list(scattering.parameters()) == [] and scattering.state_dict() == {}
    assert scattering(images(2)).shape == (2, 243, 8, 8)
    for name, expected in (("scatter_linear", 155_530), ("scatter_cnn", 187_210)):  # T&B: 155K and 187K
        model = create_model(name)
        assert sum(p.numel() for p in model.parameters()) == expected
        assert not [n for n, _ in model.named_parameters() if n.startswith("scattering")]


def test_constant_image_gives_its_value_at_order_0_and_zero_above() -> None:
    # Morlet wavelets have zero mean and the low-pass has unit mass.
    out = Scattering2D(32)(torch.full((1, 3, 32, 32), 0.7)).view(1, 3, 81, 8, 8)
    assert torch.allclose(out[:, :, 0], torch.full_like(out[:, :, 0], 0.7), atol=1e-6)
    assert out[:, :, 1:].abs().max() < 1e-5


def test_positively_homogeneous_and_deterministic() -> None:
    scattering, x = Scattering2D(32), images(20)
    out = scattering(x)
    assert torch.equal(out, scattering(x))
    assert torch.allclose(scattering(2.5 * x), 2.5 * out, rtol=1e-5, atol=1e-6)
    # Each image is transformed on its own: internal chunking does not change a result.
    assert torch.allclose(scattering(x[7:8]), out[7:8], rtol=1e-5, atol=1e-7)


def test_stable_to_small_translations() -> None:
    big = images(8, 40, seed=1)
    x, shifted = big[..., 4:36, 4:36], big[..., 4:36, 5:37]  # the same scene moved by one pixel
    centred = x - x.mean((2, 3), keepdim=True)
    assert (centred - (shifted - shifted.mean((2, 3), keepdim=True))).norm() > 1.2 * centred.norm()  # white noise
    scattering = Scattering2D(32)
    out = scattering(x)
    assert (scattering(shifted) - out).norm() < 0.1 * out.norm()


@pytest.mark.parametrize("j", [0, 1])
def test_wavelets_peak_at_their_frequency_and_angle(j: int) -> None:
    size, L = 128, 8
    for t in range(L):
        theta = (L // 2 - 1 - t) * math.pi / L
        spectrum = morlet_fourier(size, sigma=0.8 * 2**j, theta=theta, xi=0.75 * math.pi / 2**j, slant=4 / L)
        row, col = divmod(int(spectrum.abs().argmax()), size)
        u, v = [(k + size // 2) % size - size // 2 for k in (row, col)]
        # At j=0 the spectrum reaches the Nyquist frequency and its periodic copies move the peak by up to 4%.
        assert math.hypot(u, v) * 2 * math.pi / size == pytest.approx(0.75 * math.pi / 2**j, rel=0.05)
        assert math.atan2(v, u) == pytest.approx(theta, abs=2 / math.hypot(u, v))
        assert abs(spectrum[0, 0]) < 1e-12  # zero mean


def test_no_gradient_reaches_the_input() -> None:
    x = images(2).requires_grad_(True)
    assert not Scattering2D(32)(x).requires_grad


@pytest.mark.parametrize("kwargs, words", [
    ({"groups": 10}, "groups=10 must divide the 243"),
    ({"image_size": 30}, r"multiple of 2\^J=4"),
    ({"image_size": 4}, r"multiple of 2\^J=4"),
])
def test_config_errors(kwargs: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        create_model("scatter_linear", **kwargs)
    with pytest.raises(ConfigError, match="multiple of 8"):
        create_model("scatter_cnn", image_size=36)
    with pytest.raises(ConfigError, match=r"built for \(B, C, 32, 32\)"):
        create_model("scatter_linear")(images(1, 24))


# Opacus's hooks warn that the first trained layer's input needs no gradient: it comes from the frozen transform.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_clipped_gradients_match_one_example_at_a_time() -> None:
    torch.manual_seed(0)
    model = prepare_model(create_model("scatter_cnn"))
    x, y = images(4), torch.tensor([0, 3, 3, 9])
    params = trainable_parameters(model)
    C = 1e-3  # below every per-example norm: every example is clipped
    want = [torch.zeros_like(p) for p in params]
    for i in range(len(y)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        assert norm > C
        want = [w + C / (norm + 1e-6) * g for w, g in zip(want, grads)]
    for method in ("fast", "hooks"):
        got = clipped_grad_sum(model, x, y, max_grad_norm=C, method=method).grads
        for g, w in zip(got, want):
            assert (g - w).norm() <= 1e-4 * w.norm()


def test_dp_sgd_step_trains_only_the_head() -> None:
    g = torch.Generator().manual_seed(0)
    data = Split(images=torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g),
                 labels=torch.randint(0, 10, (64,), generator=g))
    loader = BatchLoader(data, batch_size=16, preprocess=fit_preprocessor("none", data.images), sampling="shuffle")
    torch.manual_seed(0)
    model = prepare_model(create_model("scatter_linear"))
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), loader, epochs=1,
                           max_grad_norm=0.1, noise_multiplier=1.0, accountant="rdp")
    filters = {name: buffer.clone() for name, buffer in private.model.named_buffers()}
    before = private.model.fc.weight.detach().clone()
    x, y = next(iter(private.loader.batches(g)))
    result = private.step(private.model, x, y)
    assert result.count == len(y) and torch.isfinite(torch.as_tensor(result.loss_sum))
    assert not torch.equal(private.model.fc.weight, before)
    assert all(torch.equal(buffer, filters[name]) for name, buffer in private.model.named_buffers())
    assert private.steps == 1 and private.epsilon() > 0
