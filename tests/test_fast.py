"""The `fast` model (whitening, TTA, lookahead), the run's init hook, and the time-to-accuracy benchmark."""
from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cifarlab.config import RunConfig, load_recipe
from cifarlab.data.loader import BatchLoader, TrainData
from cifarlab.data.preprocess import fit_preprocessor
from cifarlab.data.sources import Split
from cifarlab.errors import ConfigError
from cifarlab.models import create_model
from cifarlab.models.fast import WHITEN_EPS, FastNet, fast
from cifarlab.train.bench import append_csv, crossing, format_rows, time_to_accuracy
from cifarlab.train.run import init_model_from_data

TINY = dict(width1=8, width2=16, width3=16)


def smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """Images with strongly correlated neighbouring pixels and channels, as natural images have."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, 8, 8, generator=generator)
    x = F.interpolate(base, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return x + 0.3 * torch.randn(n, 3, 32, 32, generator=generator)


def test_whitening_decorrelates_patches_to_unit_variance():
    images = smooth_images(60)
    model = fast(**TINY)
    model.init_from_data(images)
    out = F.conv2d(images.double(), model.whiten_weight.double(), model.whiten_bias.double())  # (N, 24, 31, 31)
    half = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    torch.testing.assert_close(out[:, 12:], -out[:, :12])  # each filter next to its negative
    # reference: eigenvalues of the patch covariance, computed slowly from explicitly cut patches
    patches = torch.stack([images[:, :, i:i + 2, j:j + 2].reshape(len(images), 12)
                           for i in range(31) for j in range(31)], 1).reshape(-1, 12).double()
    eigenvalues = torch.linalg.eigvalsh(torch.cov(patches.T, correction=0))
    covariance = torch.cov(half.T, correction=0)
    torch.testing.assert_close(covariance, torch.diag(eigenvalues / (eigenvalues + WHITEN_EPS)), atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(half.mean(0), torch.zeros(12, dtype=torch.float64), atol=1e-6, rtol=0)


def test_whitening_is_fitted_not_trained_and_is_saved():
    model = fast(**TINY)
    names = {name for name, _ in model.named_parameters()}
    assert not any("whiten" in name for name in names)
    model.init_from_data(smooth_images(20))
    rebuilt = fast(**TINY)
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.whiten_weight, model.whiten_weight)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model.init_from_data(torch.zeros(4, 32, 32))


def _shift(x: torch.Tensor, d: int) -> torch.Tensor:
    """Reference: out[i, j] = x[i + d, j + d], indices past the border reflected (-1 -> 1, 32 -> 30)."""
    size = x.shape[-1]
    index = torch.tensor([abs(i + d) if i + d < size else 2 * (size - 1) - (i + d) for i in range(size)])
    return x[:, :, index][:, :, :, index]


def test_tta_is_the_mean_of_logits_over_flipped_and_shifted_views():
    torch.manual_seed(0)
    model = fast(**TINY, tta=2, lookahead_every=0).eval()
    plain = fast(**TINY, tta=0, lookahead_every=0).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 32, 32)
    views = [x, x.flip(3), _shift(x, -1), _shift(x, -1).flip(3), _shift(x, 1), _shift(x, 1).flip(3)]
    with torch.no_grad():
        expected = torch.stack([plain(v) for v in views]).mean(0)
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(model(x), model.get_classifier()(model.forward_features(x)))
        model.tta = 1
        torch.testing.assert_close(model(x), (plain(x) + plain(x.flip(3))) / 2)
    model.train()
    assert torch.equal(model(x), plain.train()(x))  # training forwards see one view


def test_dropout_acts_on_the_view_averaged_features_and_only_when_enabled():
    torch.manual_seed(0)
    model = fast(**TINY, tta=1, lookahead_every=0, dropout=0.5).eval()
    plain = fast(**TINY, tta=1, lookahead_every=0).eval()
    plain.load_state_dict(model.state_dict())  # dropout has no weights: the same state dict
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))  # eval: dropout off
        model.dropout.train()  # what MC dropout does
        features = plain.forward_features(x)
        kept = model.forward_features(x)
    zeroed = kept == 0
    assert zeroed.any() and not zeroed.all()
    torch.testing.assert_close(kept[~zeroed], 2 * features[~zeroed])  # inverted dropout on the averaged features


def test_lookahead_moves_weights_to_the_slow_copy_every_k_steps():
    torch.manual_seed(0)
    k, alpha = 3, 0.5
    model = fast(**TINY, lookahead_every=k, lookahead_alpha=alpha).train()
    param = model.fc.weight
    slow = param.detach().clone()
    x = torch.randn(2, 3, 32, 32)
    for step in range(1, 8):
        before_tick = param.detach().clone()
        model(x)  # the tick happens before the forward
        if step % k == 0:
            slow = slow + alpha * (before_tick - slow)
            torch.testing.assert_close(param.detach(), slow)
        else:
            assert torch.equal(param.detach(), before_tick)
        with torch.no_grad():
            param.add_(0.1)  # stands in for an optimizer step
    model.eval()
    before = param.detach().clone()
    model(x)
    assert torch.equal(param.detach(), before)  # evaluation never ticks
    resumed = fast(**TINY, lookahead_every=k, lookahead_alpha=alpha)
    resumed.load_state_dict(model.state_dict())
    assert resumed.lookahead_steps == 7  # the phase of the k-step cycle survives a checkpoint


def test_compiled_training_ticks_lookahead_eagerly_and_eval_only_use_skips_dynamo():
    """The tick is kept out of compiled graphs (it counts in Python and writes weights in place) by a disable
    applied at its first call, so a model used only for inference never imports torch._dynamo."""
    code = "import sys, cifarlab.models, cifarlab.continual.state; print('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"

    def train(compiled: bool) -> FastNet:
        torch.manual_seed(0)
        model = fast(**TINY, lookahead_every=2, num_classes=3).train()
        forward = torch.compile(model, backend="eager") if compiled else model  # eager: no C++ compiler needed
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 3
        for _ in range(5):
            optimizer.zero_grad()
            F.cross_entropy(forward(x), y).backward()
            optimizer.step()
        return model

    eager, compiled = train(False), train(True)
    assert compiled.lookahead_steps == eager.lookahead_steps == 5
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kwargs, words", [
    ({"tta": 3}, "tta must be one of"),
    ({"width2": 0}, "widths must be positive"),
    ({"convs_per_block": 0}, "convs_per_block"),
    ({"lookahead_every": -1}, "lookahead_every"),
    ({"lookahead_alpha": 0.0}, "lookahead_alpha"),
    ({"dropout": 1.0}, "fast: dropout must be a probability"),
    ({"identity_init": "yes"}, "identity_init must be true or false"),
    ({"activation": "relu"}, "activation must be one of gelu, silu, got 'relu'"),
])
def test_bad_arguments_name_the_argument(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        fast(**kwargs)


def test_identity_init_makes_each_conv_pass_its_input_channels_through_at_the_centre_tap():
    torch.manual_seed(0)
    model = fast(width1=8, width2=16, width3=16, identity_init=True, lookahead_every=0, tta=0)
    convs = [m for m in model.blocks if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        out_ch, in_ch = conv.weight.shape[:2]
        x = torch.randn(2, in_ch, 5, 5)
        passed = min(out_ch, in_ch)
        torch.testing.assert_close(conv(x)[:, :passed], x[:, :passed])  # identity filters, zero elsewhere
        if out_ch > in_ch:
            assert conv.weight[in_ch:].abs().sum() > 0  # the extra filters keep their random start
    plain = fast(width1=8, width2=16, width3=16, lookahead_every=0, tta=0)
    conv = next(m for m in plain.blocks if isinstance(m, torch.nn.Conv2d))
    assert conv.weight[0, 0, 1, 1] != 1.0


def test_activation_silu_replaces_every_gelu_and_keeps_the_layer_names():
    torch.manual_seed(0)
    gelu = fast(width1=8, width2=16, width3=16, lookahead_every=0, tta=0)
    torch.manual_seed(0)
    silu = fast(width1=8, width2=16, width3=16, lookahead_every=0, tta=0, activation="silu")
    kinds = {type(m) for m in silu.modules()}
    assert torch.nn.SiLU in kinds and torch.nn.GELU not in kinds
    assert [name for name, _ in gelu.named_modules()] == [name for name, _ in silu.named_modules()]
    x = torch.randn(4, 3, 32, 32)
    silu.load_state_dict(gelu.state_dict())  # the same weights: only the nonlinearity differs
    gelu.eval(), silu.eval()
    assert not torch.allclose(gelu(x), silu(x))
    gelu.whiten_activation, gelu.blocks = torch.nn.functional.silu, silu.blocks
    torch.testing.assert_close(gelu(x), silu(x))  # ... everywhere: after the whitening and after each BatchNorm


@pytest.mark.parametrize("name", ["fast-cpu", "fast-cpu90", "fast-gpu94", "fast-gpu95", "fast-gpu96"])
def test_fast_recipes_validate_and_build(name):
    config = RunConfig.from_dict(load_recipe(name), source=name)
    assert isinstance(create_model(config.model.name, **config.model.args), FastNet)


class _Recorder(torch.nn.Module):
    def init_from_data(self, images: torch.Tensor) -> None:
        self.images = images


def test_run_hook_gives_strided_normalised_training_images():
    labels = torch.arange(100) // 10  # sorted by class, as image folders are
    images = torch.randint(0, 256, (100, 3, 4, 4), dtype=torch.uint8)
    preprocess = fit_preprocessor("normalize", images)
    loader = BatchLoader(Split(images, labels), batch_size=10, preprocess=preprocess)
    data = TrainData(train=loader, evals={}, preprocess=preprocess, classes=tuple("abcdefghij"), source="synthetic")
    model = _Recorder()
    init_model_from_data(model, data, count=20)
    torch.testing.assert_close(model.images, preprocess(images[::5].float() / 255))
    init_model_from_data(torch.nn.Linear(2, 2), data)  # models without the method are left alone


def test_crossing_times_training_up_to_the_epoch_plus_its_evaluation():
    acc, epochs, evals = [0.5, 0.84, 0.86, 0.91], [10.0, 11.0, 12.0, 13.0], [1.0, 2.0, 3.0, 4.0]
    assert crossing(acc, epoch_seconds=epochs, eval_seconds=evals, setup_seconds=0.5, threshold=0.85) == (3, 36.5)
    assert crossing(acc, epoch_seconds=epochs, eval_seconds=evals, setup_seconds=0.5, threshold=0.5) == (1, 11.5)
    assert crossing(acc, epoch_seconds=epochs, eval_seconds=evals, setup_seconds=0.5, threshold=0.95) is None


def test_crossing_skips_epochs_that_were_not_evaluated():
    acc, epochs, evals = [None, None, 0.86, 0.91], [10.0, 11.0, 12.0, 13.0], [None, None, 3.0, 4.0]
    assert crossing(acc, epoch_seconds=epochs, eval_seconds=evals, setup_seconds=0.5, threshold=0.5) == (3, 36.5)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_bench_trains_privately_with_dp_and_can_skip_early_evaluations(small_cifar):
    config = RunConfig.from_dict({
        "data": {"path": str(small_cifar), "preprocess": "none", "crop_padding": 0, "flip": False},
        "model": {"name": "scatter_linear"},
        "optim": {"optimizer": "sgd", "lr": 2.0, "momentum": 0.9, "schedule": "constant"},
        "train": {"epochs": 2, "batch_size": 250, "device": "cpu", "progress": False},
        "dp": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 0.1, "delta": 1e-4},
    })
    runs = []
    (row,) = time_to_accuracy(config, thresholds=[0.0], seeds=[0], eval_from=2,
                              on_run=lambda seed, run: runs.append(run))
    assert runs[0]["test_acc"][0] is None and runs[0]["eval_seconds"][0] is None and runs[0]["test_acc"][1] > 0
    assert row["epoch_mean"] == 2 and row["eval_from"] == 2
    assert 0 < row["epsilon"] < 10  # spent by 2 epochs at q = 0.25, sigma = 1
    with pytest.raises(ConfigError, match="eval-from must be an epoch in 1..2"):
        time_to_accuracy(config, thresholds=[0.5], seeds=[0], eval_from=3)


def test_bench_rows_table_and_csv_on_real_images(small_cifar, tmp_path):
    config = RunConfig.from_dict({
        "recipe": "tiny",
        "data": {"path": str(small_cifar), "train_subset": 200, "test_subset": 100},
        "model": {"name": "fast", "args": {**TINY, "tta": 1}},
        "optim": {"lr": 0.2, "nesterov": True, "schedule": "onecycle", "label_smoothing": 0.2},
        "train": {"epochs": 1, "batch_size": 100, "device": "cpu", "progress": False},
    })
    finished = []
    rows = time_to_accuracy(config, thresholds=[0.0, 1.0], seeds=[0, 1],
                            on_run=lambda seed, run: finished.append((seed, len(run["test_acc"]))))
    assert finished == [(0, 1), (1, 1)]
    reached, never = rows
    assert reached["reached"] == 2 and reached["epoch_mean"] == 1
    assert 0 < reached["seconds_min"] <= reached["seconds_mean"] <= reached["seconds_max"]
    assert never["reached"] == 0 and never["seconds_mean"] is None
    assert 0 <= reached["final_acc_min"] <= reached["final_acc_mean"] <= reached["final_acc_max"] <= 1
    assert reached["images_per_second"] > 0 and reached["peak_memory_mb"] > 0 and reached["epsilon"] is None
    table = format_rows(rows)
    assert "tiny" in table and "2/2" in table and "0/2" in table
    path = tmp_path / "bench.csv"
    append_csv(path, rows)
    append_csv(path, rows[:1])
    with open(path) as f:
        saved = list(csv.DictReader(f))
    assert [float(r["threshold"]) for r in saved] == [0.0, 1.0, 0.0]
    assert saved[1]["seconds_mean"] == "" and math.isclose(float(saved[0]["seconds_mean"]), reached["seconds_mean"])


def test_bench_rejects_thresholds_given_in_percent():
    with pytest.raises(ConfigError, match="fractions"):
        time_to_accuracy(RunConfig(), thresholds=[85], seeds=[0])
