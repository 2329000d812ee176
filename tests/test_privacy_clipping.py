"""Per-example clipping against a slow reference: one example at a time, plain autograd."""
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.errors import ConfigError
from cifarlab.models import create_model
from cifarlab.models.layers import WSConv2d
from cifarlab.privacy import clipping
from cifarlab.privacy.clipping import check_fast_supported, clipped_grad_sum, trainable_parameters



class EveryRule(nn.Module):
    """One layer for each rule of the fast path: conv by per-example gradients (c1: one convolution, as for an
    RGB input; c3 grouped: a grouped weight-gradient call),
    conv by Gram norms (c4), GroupNorm (Opacus's rule), weight-standardised conv by per-example gradients (c2)
    and by Gram norms (c5), linear;
    an in-place ReLU on a conv output (the backward capture must see the pre-ReLU gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.gn = nn.GroupNorm(2, 4)
        self.c2 = WSConv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.c3 = nn.Conv2d(8, 32, 3, padding=1, groups=2)
        self.c4 = nn.Conv2d(32, 32, 3, padding=1)  # 4x4 output: T(d+o) < 2*d*o, the Gram rule
        self.c5 = WSConv2d(32, 32, 3, padding=1)  # the Gram rule for a standardised weight
        self.fc = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x):
        x = self.gn(self.relu(self.c1(x)))
        x = F.relu(self.c3(F.relu(self.c2(x))))
        x = F.max_pool2d(F.relu(self.c5(self.relu(self.c4(x)))), 2)
        return self.fc(x.flatten(1))


def reference(model, x, y, *, max_grad_norm, views):
    """sum_i min(1, C/||g_i||) g_i with g_i the gradient of example i's view-averaged loss, one example at a time."""
    params = trainable_parameters(model)
    total, norms = [torch.zeros_like(p) for p in params], []
    for i in range(len(y) // views):
        rows = slice(i * views, (i + 1) * views)
        grads = torch.autograd.grad(F.cross_entropy(model(x[rows]), y[rows]), params)
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        norms.append(norm)
        total = [t + min(1.0, max_grad_norm / (norm.item() + 1e-6)) * g for t, g in zip(total, grads)]
    return total, torch.stack(norms)


def close(got, want, rel=1e-5):
    """Equal up to float32 rounding, relative to the tensor's size (elementwise rtol fails near zero)."""
    return (got - want).norm() <= rel * want.norm() + 1e-7


def batch(n, views, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n * views, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g).repeat_interleave(views)
    return x, y


@pytest.mark.parametrize("method", ["fast", "hooks"])
@pytest.mark.parametrize("views", [1, 3])
def test_clipped_sum_matches_one_example_at_a_time(method, views):
    torch.manual_seed(0)
    model = EveryRule()
    if method == "hooks":  # Opacus's hooks cannot see through in-place ops (prepare_model turns them off)
        model.relu.inplace = False
    x, y = batch(6, views)
    C = 0.5  # below every norm here, so every example is clipped ...
    expected, norms = reference(model, x, y, max_grad_norm=C, views=views)
    result = clipped_grad_sum(model, x, y, max_grad_norm=C, views=views, method=method)
    assert torch.allclose(result.norms, norms, rtol=1e-4)
    assert (norms > C).all()
    for got, want in zip(result.grads, expected):
        assert close(got, want)
    # ... and with a large C nothing is clipped: the plain sum of gradients.
    loose, _ = reference(model, x, y, max_grad_norm=1e6, views=views)
    for got, want in zip(clipped_grad_sum(model, x, y, max_grad_norm=1e6, views=views, method=method).grads, loose):
        assert close(got, want)


@pytest.mark.parametrize("views", [1, 3])
def test_grouped_per_example_gradients_in_chunks(monkeypatch, views):
    # c2 and c3 take grouped weight-gradient calls, in chunks of examples: 5 examples in chunks of 2, 2 and 1
    monkeypatch.setattr(clipping, "_GROUPED_CHUNK", 2)
    torch.manual_seed(4)
    model = EveryRule()
    x, y = batch(5, views, seed=4)
    expected, norms = reference(model, x, y, max_grad_norm=0.5, views=views)
    result = clipped_grad_sum(model, x, y, max_grad_norm=0.5, views=views)
    assert torch.allclose(result.norms, norms, rtol=1e-4)
    for got, want in zip(result.grads, expected):
        assert close(got, want)


def test_wide_resnet_with_weight_standardisation_matches_one_example_at_a_time():
    # wrn-10-2 GN+WS mixes every rule on real layer shapes: its 64->128 1x1 stride-2 shortcut on 8x8 maps takes
    # the Gram rule only because the grouped kernel's slowdown is counted
    torch.manual_seed(5)
    model = create_model("wrn", depth=10, width=2, norm="group", weight_standardization=True)
    shortcut = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)][-1]
    d, o = shortcut.weight[0].numel(), shortcut.out_channels
    assert (d, o) == (64, 128) and 64 * (d + o) > d * o
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([1, 7, 3])
    expected, norms = reference(model, x, y, max_grad_norm=0.5, views=1)
    result = clipped_grad_sum(model, x, y, max_grad_norm=0.5)
    assert torch.allclose(result.norms, norms, rtol=1e-4)
    for got, want in zip(result.grads, expected):
        assert close(got, want, rel=1e-4)


@pytest.mark.parametrize("views", [1, 3])
@pytest.mark.parametrize("make_first", [lambda: nn.Conv2d(3, 4, 3, padding=1),
                                        lambda: WSConv2d(3, 4, 3, padding=1, bias=True)], ids=["conv", "wsconv"])
def test_few_input_channel_convs_per_example_by_one_convolution(make_first, views):
    # an RGB input layer takes the path that convolves the inputs with the output gradients (c_in < 8, stride 1)
    torch.manual_seed(3)  # built here, not at collection, whose global random state depends on the other test files
    model = nn.Sequential(make_first(), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    x, y = batch(5, views, seed=3)
    expected, norms = reference(model, x, y, max_grad_norm=0.2, views=views)
    result = clipped_grad_sum(model, x, y, max_grad_norm=0.2, views=views)
    assert torch.allclose(result.norms, norms, rtol=1e-4) and (norms > 0.2).all()
    for got, want in zip(result.grads, expected):
        assert close(got, want)


@pytest.mark.parametrize("views", [1, 3])
@pytest.mark.parametrize("make_first", [lambda: nn.Conv2d(3, 4, 3, padding=1),
                                        lambda: WSConv2d(3, 4, 5, padding=(2, 1), bias=True)], ids=["conv", "wsconv"])
def test_few_channel_convs_per_example_by_the_compiled_kernel(monkeypatch, make_first, views):
    # few input and output channels: the compiled multiply-and-sum, 5 examples in chunks of 2 (the last padded)
    monkeypatch.setattr(clipping, "_DIRECT_MIN_FLOPS", 0)
    monkeypatch.setattr(clipping, "_DIRECT_CHUNK", 2)
    kernel = clipping._CompiledPatchProducts()
    monkeypatch.setattr(clipping, "_compiled_patch_products", kernel)
    outputs = []
    direct = clipping._direct_per_example
    monkeypatch.setattr(clipping, "_direct_per_example", lambda *args: outputs.append(direct(*args)) or outputs[-1])
    torch.manual_seed(6)  # built here, not at collection, whose global random state depends on the other test files
    model = nn.Sequential(make_first(), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    x, y = batch(5, views, seed=6)
    model(x)  # sizes the linear layer
    expected, norms = reference(model, x, y, max_grad_norm=0.2, views=views)
    result = clipped_grad_sum(model, x, y, max_grad_norm=0.2, views=views)
    assert torch.allclose(result.norms, norms, rtol=1e-4) and (norms > 0.2).all()
    for got, want in zip(result.grads, expected):
        assert close(got, want)
    again = clipped_grad_sum(model, x, y, max_grad_norm=0.2, views=views)
    assert all(torch.equal(a, b) for a, b in zip(result.grads, again.grads))  # a seed fixes a CPU run
    if kernel.failed:  # warned, and fell back to the convolution (checked above)
        pytest.skip("torch.compile cannot build its C++ kernel on this machine")
    assert outputs and outputs[0].shape == (5, *model[0].weight.shape)  # it ran


def broken_compile(function, **options):
    def run(*args):
        raise RuntimeError("no C++ compiler\nmore lines")
    return run


@pytest.mark.parametrize("compile_, fails", [
    (broken_compile, True),  # compiling fails (no C++ compiler, say): a warning, and no second try
    # torch.compile switched off (TORCHDYNAMO_DISABLE=1, a forced-eager stance, no recompiles left) runs the function
    # as written, which would materialise every patch times every filter: it refuses, silently, each time
    (lambda function, **options: function, False),
])
def test_compiled_kernel_falls_back_to_the_convolution(monkeypatch, recwarn, compile_, fails):
    monkeypatch.setattr(torch, "compile", compile_)
    kernel = clipping._CompiledPatchProducts()
    monkeypatch.setattr(clipping, "_compiled_patch_products", kernel)
    monkeypatch.setattr(clipping, "_DIRECT_MIN_FLOPS", 0)
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    x, y = batch(3, 1, seed=7)
    expected, _ = reference(model, x, y, max_grad_norm=0.2, views=1)
    for got, want in zip(clipped_grad_sum(model, x, y, max_grad_norm=0.2).grads, expected):
        assert close(got, want)
    warned = [str(w.message) for w in recwarn.list if "torch.compile" in str(w.message)]
    assert warned == (["torch.compile failed (RuntimeError: no C++ compiler); per-example gradients of few-channel "
                       "convolutions fall back to a slower kernel"] if fails else [])
    assert kernel.failed == fails
    assert clipping._direct_per_example(x, torch.zeros(3, 4, 8, 8), 1, (1, 1)) is None


@pytest.mark.parametrize("method", ["fast", "hooks"])
def test_every_clipped_example_has_norm_at_most_C(method):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    x, y = batch(8, 1, seed=1)
    C = 0.3
    for i in range(len(y)):
        one = clipped_grad_sum(model, x[i:i + 1], y[i:i + 1], max_grad_norm=C, method=method)
        clipped_norm = torch.sqrt(sum(g.square().sum() for g in one.grads))
        assert clipped_norm <= C * (1 + 1e-5)
        assert clipped_norm == pytest.approx(min(C, one.norms.item()), rel=1e-4)


def test_losses_and_logits_are_per_example_view_averages():
    torch.manual_seed(2)
    model = EveryRule()
    x, y = batch(4, 2, seed=2)
    result = clipped_grad_sum(model, x, y, max_grad_norm=1.0, views=2)
    with torch.no_grad():
        logits = model(x)
    assert torch.allclose(result.logits, logits.view(4, 2, 10).mean(1), atol=1e-5)
    assert torch.allclose(result.losses, F.cross_entropy(logits, y, reduction="none").view(4, 2).mean(1), atol=1e-5)


def test_model_is_left_as_it_was():
    model = EveryRule()
    x, y = batch(3, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clipped_grad_sum(model, x, y, max_grad_norm=1.0)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.c1._forward_hooks


def test_fast_path_keeps_no_activation_after_the_call():
    # its gradient taps once formed a cycle (tensor hook -> tap -> tensor) that leaked every call's activations,
    # about 100 MB a step for cnn at batch 128, until the process ran out of memory
    model = EveryRule()
    x, y = batch(3, 1)
    outputs = []
    model.c4.register_forward_hook(lambda module, inputs, output: outputs.append(weakref.ref(output)))
    clipped_grad_sum(model, x, y, max_grad_norm=1.0, method="fast")
    gc.collect()
    assert len(outputs) == 1 and outputs[0]() is None


def test_unsupported_models_are_refused_with_the_layer_name():
    class Owner(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.scale * self.fc(x)

    with pytest.raises(ConfigError, match="owns parameters"):
        check_fast_supported(nn.Sequential(Owner()))

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    with pytest.raises(ConfigError, match="ran twice"):
        clipped_grad_sum(Tied(), torch.randn(2, 4), torch.tensor([0, 1]), max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="valid: fast, hooks"):
        clipped_grad_sum(Tied(), torch.randn(2, 4), torch.tensor([0, 1]), max_grad_norm=1.0, method="ghost")


@pytest.mark.parametrize("stride,dilation,padding", [(1, 1, 1), (2, 1, 0), (2, 2, (1, 2))])
def test_patches_are_unfold(stride, dilation, padding):
    from cifarlab.privacy.clipping import _patches
    conv = nn.Conv2d(3, 4, 3, stride=stride, dilation=dilation, padding=padding)
    a = torch.randn(2, 3, 9, 9)
    expected = F.unfold(a, 3, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
    assert torch.equal(_patches(a, conv), expected)


@pytest.mark.parametrize("width", [3, 64])  # explicit per-example gradients vs Gram norms for a sequence input
def test_linear_over_positions(width):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, width), nn.Flatten(), nn.Linear(5 * width, 10))
    x, y = torch.randn(8, 5, 64), torch.randint(0, 10, (8,))
    expected, norms = reference(model, x, y, max_grad_norm=0.1, views=1)
    result = clipped_grad_sum(model, x, y, max_grad_norm=0.1)
    assert torch.allclose(result.norms, norms, rtol=1e-4)
    assert all(close(got, want) for got, want in zip(result.grads, expected))
