"""Tests of the model zoo: every registered model, exact parameter counts, torchvision-compatible
ResNet-18 keys, stochastic depth, weight standardization, external wrappers and config errors."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.errors import ConfigError
from cifarlab.models import EXTERNAL_NOTE, create_model, describe_model, list_models
from cifarlab.models.layers import BasicBlock, WSConv2d
from cifarlab.models.resnet_cifar import PadShortcut



NATIVE = list_models()
# Defaults of every model, plus the DP variant of the WRN (different norm, conv and dropout).
CASES = [(name, {}) for name in NATIVE] + [
    ("wrn", {"depth": 10, "width": 1, "dropout": 0.3, "norm": "group", "groups": 8, "weight_standardization": True}),
]


def _ids(case: tuple[str, dict]) -> str:
    name, kwargs = case
    return name + "".join(f"-{k}={v}" for k, v in kwargs.items())


def test_registry_lists_every_family() -> None:
    assert NATIVE == sorted(NATIVE)
    assert {"tutorial", "tutorial_deep", "tutorial_wide", "cnn", "cnn_bn", "vgg", "resnet18", "resnet18_cifar",
            "resnet", "preact_resnet18", "wrn"} <= set(NATIVE)
    for name in NATIVE:
        description = describe_model(name)
        assert description and "\n" not in description
    assert describe_model("timm:resnet50").startswith("resnet50 from timm")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward_backward_features(case: tuple[str, dict]) -> None:
    name, kwargs = case
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])

    model.train()
    logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    F.cross_entropy(logits, y).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name

    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        classifier = model.get_classifier()
        assert isinstance(classifier, nn.Linear) and classifier.out_features == 10
        assert features.shape == (2, classifier.in_features)
        # forward is classifier(features), and eval mode is deterministic: bitwise equal
        assert torch.equal(model(x), classifier(features))


@pytest.mark.parametrize("name", NATIVE)
def test_every_model_builds_for_cifar100(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=100).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 100) and torch.isfinite(logits).all()
    assert model.get_classifier().out_features == 100 and model.model_args["num_classes"] == 100


@pytest.mark.parametrize("name", NATIVE)
def test_same_seed_same_init_and_rebuild_from_model_args(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    args = json.loads(json.dumps(model.model_args))  # plain values: survive a JSON/YAML round trip
    assert model.model_name == name and args["num_classes"] == 7
    torch.manual_seed(0)
    rebuilt = create_model(model.model_name, **args)
    torch.manual_seed(1)
    other = create_model(name, num_classes=7)
    state, rebuilt_state, other_state = model.state_dict(), rebuilt.state_dict(), other.state_dict()
    assert list(state) == list(rebuilt_state)
    assert all(torch.equal(state[k], rebuilt_state[k]) for k in state)
    assert not all(torch.equal(state[k], other_state[k]) for k in state)


def test_model_args_hold_resolved_defaults() -> None:
    model = create_model("wrn", depth=10)
    assert model.model_args == {"num_classes": 10, "depth": 10, "width": 4, "dropout": 0.0, "norm": "batch",
                                "groups": 16, "weight_standardization": False}


# cnn and vgg pool adaptively to their 4x4 fc input; the ResNets pool globally (the cheapest stands in).
@pytest.mark.parametrize("name, kwargs", [("cnn", {}), ("vgg", {}), ("resnet", {"depth": 8}),
                                          ("wrn", {"depth": 10, "width": 1})])
def test_other_input_sizes(name: str, kwargs: dict) -> None:
    model = create_model(name, **kwargs).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 40, 40)).shape == (1, 10)


def _cifar_resnet_params(depth: int, classes: int) -> int:
    """He et al. CIFAR ResNet, counted by hand: convs have no bias, BN has 2 params per channel."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16
    for in_ch, out_ch in ((16, 16), (16, 32), (32, 64)):
        total += 9 * in_ch * out_ch + 9 * out_ch * out_ch + 4 * out_ch  # first block (option A: no shortcut params)
        total += (n - 1) * (18 * out_ch * out_ch + 4 * out_ch)
    return total + 64 * classes + classes


def _wrn_params(depth: int, width: int, classes: int) -> int:
    """Zagoruyko & Komodakis WRN, counted by hand: pre-activation blocks, 1x1 shortcut on width change."""
    n = (depth - 4) // 6
    total = 3 * 16 * 9
    in_ch = 16
    for out_ch in (16 * width, 32 * width, 64 * width):
        total += 2 * in_ch + 9 * in_ch * out_ch + 2 * out_ch + 9 * out_ch * out_ch + in_ch * out_ch
        total += (n - 1) * (4 * out_ch + 18 * out_ch * out_ch)
        in_ch = out_ch
    return total + 2 * in_ch + in_ch * classes + classes


@pytest.mark.parametrize("name, kwargs, expected", [
    ("tutorial", {}, 62_006),  # the number printed by the PyTorch tutorial
    # 3x3 convs 3-32-32-64-64-128-128 (with biases), fc 2048-128-10
    ("tanh_cnn", {}, sum(9 * i * o + o for i, o in [(3, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128)])
     + 2048 * 128 + 128 + 128 * 10 + 10),
    ("resnet18", {"num_classes": 1000}, 11_689_512),  # torchvision.models.resnet18()
    ("resnet18_cifar", {}, 11_173_962),
    ("resnet", {"depth": 20}, _cifar_resnet_params(20, 10)),
    ("resnet", {"depth": 110}, _cifar_resnet_params(110, 10)),
    ("preact_resnet18", {}, 11_172_170),  # kuangliu's 11,171,146 + the final BN (2 x 512)
    ("wrn", {"depth": 16, "width": 4}, _wrn_params(16, 4, 10)),
    ("wrn", {"depth": 16, "width": 4, "norm": "group", "weight_standardization": True}, _wrn_params(16, 4, 10)),
    ("wrn", {"depth": 28, "width": 10}, _wrn_params(28, 10, 10)),
])
def test_parameter_counts(name: str, kwargs: dict, expected: int) -> None:
    assert sum(p.numel() for p in create_model(name, **kwargs).parameters()) == expected


def test_parameter_counts_match_papers() -> None:
    assert round(_cifar_resnet_params(20, 10) / 1e6, 2) == 0.27  # He et al. 2016, Table 6
    assert round(_cifar_resnet_params(110, 10) / 1e6, 1) == 1.7
    assert round(_wrn_params(16, 4, 10) / 1e6, 2) == 2.75  # Zagoruyko & Komodakis 2016, Table 4
    assert round(_wrn_params(28, 10, 10) / 1e6, 1) == 36.5


def _bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,), f"{prefix}.running_mean": (channels,),
            f"{prefix}.running_var": (channels,), f"{prefix}.num_batches_tracked": ()}


# torchvision.models.resnet18().state_dict(): 122 entries, written out by hand from torchvision.models.resnet.
TORCHVISION_RESNET18 = {
    "conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64),
    "layer1.0.conv1.weight": (64, 64, 3, 3), **_bn("layer1.0.bn1", 64),
    "layer1.0.conv2.weight": (64, 64, 3, 3), **_bn("layer1.0.bn2", 64),
    "layer1.1.conv1.weight": (64, 64, 3, 3), **_bn("layer1.1.bn1", 64),
    "layer1.1.conv2.weight": (64, 64, 3, 3), **_bn("layer1.1.bn2", 64),
    "layer2.0.conv1.weight": (128, 64, 3, 3), **_bn("layer2.0.bn1", 128),
    "layer2.0.conv2.weight": (128, 128, 3, 3), **_bn("layer2.0.bn2", 128),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1), **_bn("layer2.0.downsample.1", 128),
    "layer2.1.conv1.weight": (128, 128, 3, 3), **_bn("layer2.1.bn1", 128),
    "layer2.1.conv2.weight": (128, 128, 3, 3), **_bn("layer2.1.bn2", 128),
    "layer3.0.conv1.weight": (256, 128, 3, 3), **_bn("layer3.0.bn1", 256),
    "layer3.0.conv2.weight": (256, 256, 3, 3), **_bn("layer3.0.bn2", 256),
    "layer3.0.downsample.0.weight": (256, 128, 1, 1), **_bn("layer3.0.downsample.1", 256),
    "layer3.1.conv1.weight": (256, 256, 3, 3), **_bn("layer3.1.bn1", 256),
    "layer3.1.conv2.weight": (256, 256, 3, 3), **_bn("layer3.1.bn2", 256),
    "layer4.0.conv1.weight": (512, 256, 3, 3), **_bn("layer4.0.bn1", 512),
    "layer4.0.conv2.weight": (512, 512, 3, 3), **_bn("layer4.0.bn2", 512),
    "layer4.0.downsample.0.weight": (512, 256, 1, 1), **_bn("layer4.0.downsample.1", 512),
    "layer4.1.conv1.weight": (512, 512, 3, 3), **_bn("layer4.1.bn1", 512),
    "layer4.1.conv2.weight": (512, 512, 3, 3), **_bn("layer4.1.bn2", 512),
    "fc.weight": (1000, 512), "fc.bias": (1000,),
}


def test_resnet18_matches_torchvision_state_dict() -> None:
    assert len(TORCHVISION_RESNET18) == 122
    model = create_model("resnet18", num_classes=1000)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == TORCHVISION_RESNET18
    generator = torch.Generator().manual_seed(0)
    foreign = {k: torch.randn(shape, generator=generator) for k, shape in TORCHVISION_RESNET18.items()}
    foreign.update({k: torch.tensor(5) for k in TORCHVISION_RESNET18 if k.endswith("num_batches_tracked")})
    model.load_state_dict(foreign, strict=True)
    assert torch.equal(model.fc.weight, foreign["fc.weight"])
    # ImageNet stem: 7x7 stride-2 conv, then 3x3 stride-2 maxpool; a CIFAR image reaches layer1 at 8x8.
    assert (model.conv1.stride, model.conv1.padding) == ((2, 2), (3, 3))
    assert (model.maxpool.kernel_size, model.maxpool.stride, model.maxpool.padding) == (3, 2, 1)
    cifar = create_model("resnet18_cifar")
    assert cifar.conv1.weight.shape == (64, 3, 3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)


def test_zero_init_residual_zeroes_last_bn_of_each_block() -> None:
    model = create_model("resnet18", zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8 and all(torch.count_nonzero(b.bn2.weight) == 0 for b in blocks)
    assert all(torch.all(b.bn1.weight == 1) for b in blocks)


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(16)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, :8]) == 0 and torch.count_nonzero(out[:, 24:]) == 0


def _blocks(model: nn.Module) -> list[BasicBlock]:
    return [m for m in model.modules() if isinstance(m, BasicBlock)]


def test_stochastic_depth_survival_probabilities_decay_linearly_to_half() -> None:
    probs = [b.survival_prob for b in _blocks(create_model("resnet", depth=14, stochastic_depth=True))]
    assert probs == pytest.approx([1 - l / 6 * 0.5 for l in range(1, 7)])  # Huang et al. 2016, p_L = 0.5
    assert [b.survival_prob for b in _blocks(create_model("resnet", depth=14))] == [1.0] * 6


def test_stochastic_depth_is_random_in_training_and_deterministic_in_eval() -> None:
    torch.manual_seed(0)
    model = create_model("resnet", depth=8, stochastic_depth=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model.train()
        outs = []
        for seed in range(6):
            torch.manual_seed(seed)
            outs.append(model(x))
        torch.manual_seed(0)
        assert torch.equal(model(x), outs[0])  # same seed, same drops
        assert not all(torch.equal(out, outs[0]) for out in outs[1:])
        model.eval()
        assert torch.equal(model(x), model(x))


def test_stochastic_depth_block_matches_paper_formulas() -> None:
    torch.manual_seed(0)
    block = _blocks(create_model("resnet", depth=8, stochastic_depth=True))[0]  # identity shortcut
    p = block.survival_prob
    assert p == pytest.approx(5 / 6)
    for bn in (block.bn1, block.bn2):  # random running stats, so eval BN is not the identity
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 16, 4, 4)
    block.eval()
    with torch.no_grad():
        branch = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
        # test time: relu(p * f(x) + x), the expectation of the training-time residual
        torch.testing.assert_close(block(x), F.relu(p * branch + x))

        block.train()
        for bn in (block.bn1, block.bn2):
            bn.eval()  # fixed BN statistics, so the coin is the only randomness
        kept_out, dropped_out = F.relu(branch + x), F.relu(x)
        torch.manual_seed(0)
        kept = 0
        trials = 200
        for _ in range(trials):
            out = block(x)
            is_kept = torch.allclose(out, kept_out)
            assert is_kept or torch.equal(out, dropped_out)  # one coin for the whole batch
            kept += is_kept
    assert abs(kept / trials - p) < 4 * (p * (1 - p) / trials) ** 0.5


def test_weight_standardized_conv_matches_per_channel_reference() -> None:
    torch.manual_seed(0)
    conv = WSConv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 8, 8)
    w = torch.stack([(w_o - w_o.mean()) / (w_o.var(unbiased=False) + conv.eps).sqrt() for w_o in conv.weight])
    torch.testing.assert_close(conv(x), F.conv2d(x, w, padding=1))


def test_wrn_group_norm_and_weight_standardization_options() -> None:
    model = create_model("wrn", depth=10, width=2, norm="group", groups=8, weight_standardization=True)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    assert norms and all(isinstance(m, nn.GroupNorm) and m.num_groups == 8 for m in norms)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 3 * 2 + 3 and all(isinstance(m, WSConv2d) for m in convs)  # stem, blocks, shortcuts
    plain = create_model("wrn", depth=10, width=2)
    assert not any(isinstance(m, (WSConv2d, nn.GroupNorm)) for m in plain.modules())


@pytest.mark.parametrize("name, kwargs, words", [
    ("nope", {}, ["unknown model 'nope'", "resnet18", "wrn", "tutorial", "timm:"]),
    ("wrn", {"dept": 16}, ["'wrn'", "dept", "depth", "width", "weight_standardization"]),
    ("tutorial", {"dropout": 0.1}, ["'tutorial'", "dropout", "accepts: none"]),
    ("cnn", {"dropout": [0.5]}, ["dropout", "plain value"]),
    ("cnn", {"dropout": 1.0}, ["dropout", "[0, 1)"]),
    ("vgg", {"conv_dropout": -0.1}, ["conv_dropout"]),
    ("cnn", {"num_classes": 0}, ["num_classes"]),
    ("resnet", {"depth": 21}, ["6n+2", "21"]),
    ("resnet", {"depth": 2}, ["6n+2"]),
    ("resnet", {"depth": "20"}, ["resnet depth", "'20'"]),
    ("wrn", {"depth": 15}, ["6n+4", "15"]),
    ("wrn", {"width": 0}, ["wrn width"]),
    ("wrn", {"norm": "layer"}, ["'layer'", "batch", "group"]),
    ("wrn", {"norm": "group", "groups": 7}, ["groups=7", "divisible"]),
])
def test_config_errors(name: str, kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        create_model(name, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_describe_unknown_model() -> None:
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        describe_model("nope")
    assert "torchvision" in EXTERNAL_NOTE and "timm" in EXTERNAL_NOTE


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_external_library_not_installed(library: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import` fail, whether or not the library is installed.
    monkeypatch.setitem(sys.modules, library, None)
    monkeypatch.setitem(sys.modules, f"{library}.models", None)
    with pytest.raises(ConfigError, match=f"install {library}"):
        create_model(f"{library}:resnet18")


class _TinyTimmNet(nn.Module):
    """Mimics timm's model API: forward_features, forward_head(pre_logits=...), get_classifier."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 5, 3)
        self.head = nn.Linear(5, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.head(x)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _tiny_torchvision_net(num_classes: int) -> nn.Module:
    # The classifier is the last Linear inside a Sequential, as in torchvision's VGG/MobileNet.
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, num_classes)))


def test_external_wrappers_with_stand_in_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    timm = types.SimpleNamespace(is_model=lambda name: name == "tiny",
                                 create_model=lambda name, num_classes: _TinyTimmNet(num_classes))
    models = types.SimpleNamespace(list_models=lambda: ["tiny"],
                                   get_model=lambda name, num_classes: _tiny_torchvision_net(num_classes))
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(models=models))
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    x = torch.randn(2, 3, 16, 16)
    for name, make_reference, dim in [("timm:tiny", _TinyTimmNet, 5), ("torchvision:tiny", _tiny_torchvision_net, 6)]:
        torch.manual_seed(0)
        model = create_model(name, num_classes=3)
        torch.manual_seed(0)
        reference = make_reference(3)
        assert model.model_name == name and model.model_args == {"num_classes": 3}
        classifier = model.get_classifier()
        assert isinstance(classifier, nn.Linear) and (classifier.in_features, classifier.out_features) == (dim, 3)
        features = model.forward_features(x)
        assert features.shape == (2, dim)
        torch.testing.assert_close(model(x), classifier(features))
        torch.testing.assert_close(model(x), reference(x))  # wrapping does not change the function
        with pytest.raises(ConfigError, match="no model 'big'"):
            create_model(name.replace("tiny", "big"))


def test_real_timm_model_when_installed() -> None:
    pytest.importorskip("timm")
    model = create_model("timm:resnet10t", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, model.get_classifier().in_features)
        torch.testing.assert_close(model(x), model.net(x))
