"""DP-SGD under bf16 autocast: bf16 matmuls, fp32 norms, clipping, sums, noise, weights and optimizer state.

Runs on any CPU: without native bf16 oneDNN emulates it, slowly, rounding to bf16 as native kernels do.
"""
import contextlib
import json
import warnings

import pytest
import torch
from torch import nn

from cifarlab import hardware
from cifarlab.config import RunConfig
from cifarlab.data.loader import BatchLoader, TrainData
from cifarlab.data.preprocess import fit_preprocessor
from cifarlab.data.sources import Split
from cifarlab.models.layers import WSConv2d
from cifarlab.privacy.clipping import CLIP_METHODS, clipped_grad_sum
from cifarlab.privacy.dpsgd import make_private, prepare_model
from cifarlab.train.engine import fit
from helpers import train_tiny_run, write_image_folder
from test_privacy_clipping import EveryRule, batch, close, reference
from test_privacy_dpsgd import make_loader

pytestmark = pytest.mark.filterwarnings("ignore:precision bf16 on a CPU without native bf16")


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def tiny_model(seed=0):
    """An RGB conv (one-convolution rule), GroupNorm (Opacus's rule), a weight-standardised conv (Gram rule for one
    view, per-example gradients for two) and a linear head, for 3x8x8 inputs. The head starts small, so that the
    softmax is not saturated: bf16 rounding of large logits moves a saturated softmax's gradient by several percent,
    which is bf16's error, not the clipping's."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.GroupNorm(2, 8),
                          WSConv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    with torch.no_grad():
        model[-1].weight.mul_(0.1)
    return model


def total_norm(grads):
    return torch.sqrt(sum(g.double().square().sum() for g in grads))


@pytest.mark.parametrize("method", CLIP_METHODS)
def test_bf16_norms_and_clipped_sum_are_fp32_and_match_the_fp32_reference(method):
    model = tiny_model()
    x, y = batch(6, 2)
    C = 0.5
    expected, norms = reference(model, x, y, max_grad_norm=C, views=2)  # fp32, one example at a time
    with bf16():
        result = clipped_grad_sum(model, x, y, max_grad_norm=C, views=2, method=method)
    assert (norms > C).all()  # every example is clipped: the clipping factors are tested too
    assert result.norms.dtype == torch.float32 and all(g.dtype == torch.float32 for g in result.grads)
    assert torch.allclose(result.norms, norms, rtol=2e-2)  # measured: within 0.5%
    assert total_norm(g - w for g, w in zip(result.grads, expected)) <= 2e-2 * total_norm(expected)


@pytest.mark.parametrize("method", CLIP_METHODS)
def test_every_fast_rule_clips_the_bf16_gradients_one_example_at_a_time_would(method):
    # EveryRule is deep enough that bf16 moves its clipped sums by 5-12% from fp32's; per-example clipping of the
    # gradients that autograd gives under the same autocast is what the clipping has to reproduce (measured: 0.2%)
    torch.manual_seed(0)
    model = EveryRule()
    if method == "hooks":
        model.relu.inplace = False
    x, y = batch(6, 2)
    with bf16():
        expected, norms = reference(model, x, y, max_grad_norm=0.5, views=2)
        result = clipped_grad_sum(model, x, y, max_grad_norm=0.5, views=2, method=method)
    assert torch.allclose(result.norms, norms.float(), rtol=1e-2)
    for got, want in zip(result.grads, expected):
        assert got.dtype == torch.float32 and close(got, want.float(), rel=1e-2)


@pytest.mark.parametrize("method", CLIP_METHODS)
@pytest.mark.parametrize("trained", ["all layers", "the standardised conv"])
def test_every_clipped_example_has_norm_at_most_C_under_bf16(method, trained):
    # The guarantee rests on each example adding at most C, so the norm that sets an example's clipping factor
    # must be the norm of the very numbers summed. Measured: a bf16 layer output in the weight-standardised conv's
    # Gram norm put the clipped norm up to 1.7e-5 above C when that conv alone is trained, bf16 per-example
    # gradients (hooks) up to 4e-4; with fp32 throughout, 1.4e-7 at most (4 to 6 seeds of this net).
    model = tiny_model()
    if trained != "all layers":
        model.requires_grad_(False)
        model[3].requires_grad_(True)
    x, y = batch(8, 1, seed=1)
    C = 1e-2
    for i in range(len(y)):
        with bf16():
            one = clipped_grad_sum(model, x[i:i + 1], y[i:i + 1], max_grad_norm=C, method=method)
        assert one.norms.item() > C
        assert total_norm(one.grads) <= C * (1 + 1e-6)


def private_tiny(method):
    model = prepare_model(tiny_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return make_private(model, optimizer, make_loader(), epochs=1, max_grad_norm=0.5, noise_multiplier=1.0,
                        accountant="rdp", grad_sample_mode=method)


@pytest.mark.parametrize("method", CLIP_METHODS)
def test_a_dp_step_under_bf16_updates_fp32_weights_as_fp32_does(method):
    updates = {}
    for precision in ("fp32", "bf16"):
        private = private_tiny(method)
        sgd = private.optimizer.original_optimizer
        handed = []  # what the DP optimizer gives SGD: (clipped sum + noise) / (q N)
        sgd.register_step_pre_hook(lambda *_: handed.extend(p.grad.clone() for p in private.model.parameters()))
        x, y = next(iter(private.loader.batches(torch.Generator().manual_seed(0))))
        before = [p.detach().clone() for p in private.model.parameters()]
        torch.manual_seed(1)  # the same noise in both precisions
        with bf16() if precision == "bf16" else contextlib.nullcontext():
            private.step(private.model, x, y)
        updates[precision] = [b - p.detach() for b, p in zip(before, private.model.parameters())]
    params = list(private.model.parameters())
    assert all(g.dtype == torch.float32 and g.isfinite().all() for g in handed)
    flat = torch.cat([g.flatten() for g in handed])
    assert (flat.bfloat16().float() != flat).float().mean() > 0.9  # sum and noise in fp32, not rounded to bf16
    assert all(p.dtype == torch.float32 and sgd.state[p]["momentum_buffer"].dtype == torch.float32 for p in params)
    assert all(u.isfinite().all() for u in updates["bf16"])
    difference = total_norm(a - b for a, b in zip(updates["bf16"], updates["fp32"]))
    assert 0 < difference <= 2e-2 * total_norm(updates["fp32"])


def faint_channel_split(n, generator):
    """Class = the channel with +24 on noise of 0-199: learnable, not to zero loss in a few epochs (helpers'
    brightest-channel task is, and then compares nothing)."""
    labels = torch.randint(0, 3, (n,), generator=generator)
    images = torch.randint(0, 200, (n, 3, 8, 8), generator=generator)
    images[torch.arange(n), labels] += 24
    return Split(images=images.to(torch.uint8), labels=labels)


def test_dp_training_in_bf16_reaches_the_fp32_loss():
    # The engine's autocast around the DP step, end to end, with the same seeds (so the same Poisson batches and
    # noise) in fp32 and bf16. Measured (2 seeds): final train losses 0.738 / 0.739 and 0.667 / 0.670.
    histories = {}
    for precision in ("fp32", "bf16"):
        generator = torch.Generator().manual_seed(0)
        train, test = faint_channel_split(480, generator), faint_channel_split(120, generator)
        preprocess = fit_preprocessor("none", train.images)
        model = prepare_model(tiny_model())
        loader = BatchLoader(train, batch_size=48, preprocess=preprocess, sampling="shuffle")
        private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5), loader, epochs=4,
                               max_grad_norm=1.0, noise_multiplier=0.5, accountant="rdp")
        data = TrainData(train=private.loader, evals={"test": BatchLoader(test, batch_size=120, preprocess=preprocess)},
                         preprocess=preprocess, classes=("r", "g", "b"), source="synthetic")
        config = RunConfig.from_dict({"optim": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.5, "schedule": "constant"},
                                      "train": {"epochs": 4, "batch_size": 48, "device": "cpu", "progress": False,
                                                "precision": precision}})
        histories[precision] = fit(private.model, data=data, config=config, variant=private).history
    fp32, bf16_ = histories["fp32"][-1], histories["bf16"][-1]
    assert fp32["train_loss"] < 0.6 * histories["fp32"][0]["train_loss"]  # it learned
    assert bf16_["train_loss"] == pytest.approx(fp32["train_loss"], rel=0.03)
    assert bf16_["test_loss"] == pytest.approx(fp32["test_loss"], rel=0.05)
    assert abs(bf16_["test_acc"] - fp32["test_acc"]) <= 3 / 120


def test_cli_dp_run_in_bf16_records_its_precision(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_tiny_run(write_image_folder(tmp_path / "images", train=8, test=2), tmp_path / "run",
                       flags=["--dp", "--noise-multiplier", "1", "--precision", "bf16"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["privacy"]["grad_sample_mode"] == "fast"


def test_cli_dp_run_on_auto_computes_in_fp32_on_a_cpu_with_native_bf16(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_info", lambda: hardware.CpuInfo(model="bf16 CPU",
                                                                        flags=frozenset({"avx512f", "avx512_bf16"})))
    train_tiny_run(write_image_folder(tmp_path / "images", train=8, test=2), tmp_path / "run",
                   flags=["--dp", "--noise-multiplier", "1", "--precision", "auto"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["precision"] == "fp32" and "DP-SGD" in summary["precision_reason"]
