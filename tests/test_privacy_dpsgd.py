"""DP-SGD as a whole: noise scale, Poisson batches, empty and micro-batched steps, accounting, model fixes."""
import warnings

import pytest
import torch
from torch import nn

from cifarlab.data.augment import Augment
from cifarlab.data.loader import BatchLoader
from cifarlab.data.preprocess import fit_preprocessor
from cifarlab.data.sources import Split
from cifarlab.errors import CheckpointError, ConfigError
from cifarlab.io import load_tensors, save_tensors
from cifarlab.privacy import accounting
from cifarlab.privacy.dpsgd import ParamEMA, make_private, prepare_model



def make_loader(n=200, batch_size=20, sampling="shuffle", preprocess="none", augment=None):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return BatchLoader(Split(images=images, labels=labels), batch_size=batch_size,
                       preprocess=fit_preprocessor(preprocess, images), augment=augment, sampling=sampling)


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def private_setup(model=None, *, lr=0.1, **kwargs):
    model = prepare_model(model or small_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    kwargs = {"epochs": 2, "max_grad_norm": 1.0, "noise_multiplier": 1.0, "accountant": "rdp", **kwargs}
    return make_private(model, optimizer, kwargs.pop("loader", make_loader()), **kwargs)


class ZeroGradient(nn.Module):
    """Logits that do not depend on the weights: every gradient is 0, so an update is pure noise."""

    def __init__(self, size=100):
        super().__init__()
        self.fc = nn.Linear(size, size)

    def forward(self, x):
        return 0 * self.fc(torch.ones(len(x), self.fc.in_features))[:, :10]


def test_noise_has_std_sigma_C_over_expected_batch():
    sigma, C = 2.0, 0.5
    private = private_setup(ZeroGradient(), lr=1.0, noise_multiplier=sigma, max_grad_norm=C)
    before = [p.detach().clone() for p in private.model.parameters()]
    torch.manual_seed(1)
    x, y = next(iter(private.loader.batches(torch.Generator().manual_seed(0))))
    private.step(private.model, x, y)
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, private.model.parameters())])
    expected = sigma * C / 20  # expected batch size q * N = 20, whatever this batch's size
    assert update.numel() > 10000
    assert update.std().item() == pytest.approx(expected, rel=0.03)
    assert abs(update.mean().item()) < 4 * expected / update.numel() ** 0.5


def test_dp_loader_is_poisson_unless_asked():
    private = private_setup(loader=make_loader(sampling="shuffle"))
    assert private.loader.sampling == "poisson" and private.summary()["poisson"] is True
    sizes = {len(y) for _, y in private.loader.batches(torch.Generator().manual_seed(0))}
    assert len(sizes) > 1  # Poisson batch sizes vary
    with pytest.warns(UserWarning, match="not a formal guarantee"):
        shuffled = private_setup(poisson=False)
    assert shuffled.loader.sampling == "shuffle" and shuffled.summary()["poisson"] is False


def test_empty_batch_still_takes_a_noise_step():
    private = private_setup()
    before = [p.detach().clone() for p in private.model.parameters()]
    result = private.step(private.model, torch.zeros(0, 3, 8, 8),
                                torch.zeros(0, dtype=torch.long))
    assert result.count == 0 and float(result.loss_sum) == 0
    assert all(not torch.equal(b, p) for b, p in zip(before, private.model.parameters()))
    assert private.steps == 1


def test_physical_micro_batches_give_the_same_step():
    x = torch.randn(10, 3, 8, 8)
    y = torch.randint(0, 10, (10,))
    params = []
    for physical, mode in ((None, "fast"), (3, "fast"), (4, "hooks")):
        private = private_setup(physical_batch_size=physical, grad_sample_mode=mode)
        torch.manual_seed(5)  # the same noise
        private.step(private.model, x, y)
        params.append(torch.cat([p.detach().flatten() for p in private.model.parameters()]))
        assert private.steps == 1  # one optimizer (and accountant) step per logical batch
    assert torch.allclose(params[0], params[1], atol=1e-6) and torch.allclose(params[0], params[2], atol=1e-6)


def test_augmult_step_averages_views_before_clipping():
    augment = Augment(crop_padding=2, flip=True)
    private = private_setup(loader=make_loader(augment=augment), augmult=3)
    assert private.loader.views == 3
    x, y = next(iter(private.loader.batches(torch.Generator().manual_seed(0))))
    assert len(x) == 3 * len(y[::3]) and torch.equal(y[::3].repeat_interleave(3), y)
    result = private.step(private.model, x, y)
    assert result.count == len(y) // 3


def test_reported_epsilon_is_the_accountants():
    private = private_setup()
    for x, y in private.loader.batches(torch.Generator().manual_seed(0)):
        private.step(private.model, x, y)
    steps = len(private.loader)
    assert private.steps == steps
    expected = accounting.epsilon(sample_rate=0.1, noise_multiplier=1.0, steps=steps, delta=1e-5, accountant="rdp")
    assert private.on_epoch_end(0, private.model) == {"epsilon": pytest.approx(expected, rel=1e-12)}
    summary = private.summary()
    assert summary["sampling_rate"] == 0.1 and summary["steps"] == steps and summary["noise_multiplier"] == 1.0
    assert summary["delta"] == 1e-5 and summary["epsilon"] == pytest.approx(expected, rel=1e-12)


def test_target_epsilon_run_ends_at_or_below_target():
    private = private_setup(noise_multiplier=None, target_epsilon=4.0, epochs=3)
    private.accountant.history = [(private.noise_multiplier, private.sample_rate, 3 * len(private.loader))]
    assert 3.9 <= private.epsilon() <= 4.0


def test_state_roundtrip_resumes_the_accountant(tmp_path):
    private = private_setup(ema=0.9)
    x, y = next(iter(private.loader.batches(torch.Generator().manual_seed(0))))
    private.step(private.model, x, y)
    private.on_epoch_end(0, private.model)
    # through a file, as a checkpoint goes: only tensors and plain values, which weights_only loading accepts
    save_tensors(tmp_path / "state.pt", private.state_dict())
    again = private_setup(ema=0.9)
    again.load_state_dict(load_tensors(tmp_path / "state.pt", what="state"))
    assert again.steps == 1 and again.epsilon() == private.epsilon()
    assert torch.equal(again.eval_model[0].weight, private.eval_model[0].weight)
    with pytest.raises(CheckpointError, match="'rdp' accountant, this run uses 'prv'"):
        private_setup(ema=0.9, accountant="prv").load_state_dict(private.state_dict())


def test_ema_matches_the_formula():
    model = nn.Linear(2, 1)
    ema = ParamEMA(model, 0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # decay min(0.5, 2/11) = 2/11
    assert torch.allclose(ema.model.weight, start * 2 / 11 + (start + 1) * 9 / 11)
    assert not ema.model.training and not ema.model.weight.requires_grad


def test_batchnorm_becomes_groupnorm_and_the_caller_keeps_theirs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fixed = prepare_model(model)
    messages = [str(w.message) for w in caught if "GroupNorm" in str(w.message)]
    assert len(messages) == 1 and "replaced 1 BatchNorm2d" in messages[0]
    assert isinstance(fixed[1], nn.GroupNorm) and isinstance(model[1], nn.BatchNorm2d)
    assert model[2].inplace and not fixed[2].inplace


def test_what_cannot_be_made_private_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False))  # no weights for a GroupNorm
    with pytest.raises(ConfigError, match=r"layer '1' \(BatchNorm2d\).*\nFix: replace"):
        prepare_model(model)

    class FitsToData(nn.Linear):
        def init_from_data(self, images):
            pass

    with pytest.raises(ConfigError, match="init_from_data"):
        prepare_model(FitsToData(2, 2))


def test_make_private_checks_its_inputs():
    with pytest.raises(ConfigError, match="1/N"):
        private_setup(delta=1e-2)
    with pytest.raises(ConfigError, match="exactly one"):
        private_setup(target_epsilon=3.0)
    with pytest.raises(ConfigError, match="prepare_model"):
        make_private(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), torch.optim.SGD([nn.Parameter(torch.ones(1))]),
                     make_loader(), epochs=1, max_grad_norm=1.0, noise_multiplier=1.0)
    model = prepare_model(small_model())
    with pytest.raises(ConfigError, match="optimizer must hold"):
        make_private(model, torch.optim.SGD(small_model().parameters(), lr=0.1), make_loader(), epochs=1,
                     max_grad_norm=1.0, noise_multiplier=1.0)
    with pytest.warns(UserWarning, match="fitted on the private training images"):
        private_setup(loader=make_loader(preprocess="normalize"))


def test_loss_falls_on_a_learnable_task():
    # Sanity: with little noise DP-SGD still learns a task that depends on the image.
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (400,), generator=g)
    images = (torch.rand(400, 3, 8, 8, generator=g) * 100 + labels.view(-1, 1, 1, 1) * 150).to(torch.uint8)
    loader = BatchLoader(Split(images=images, labels=labels), batch_size=50,
                         preprocess=fit_preprocessor("none", images), sampling="shuffle")
    private = private_setup(loader=loader, noise_multiplier=0.3, lr=0.5)
    torch.manual_seed(0)
    for _ in range(3):
        for x, y in private.loader.batches(g):
            result = private.step(private.model, x, y)
    with torch.no_grad():
        accuracy = (private.model(images.float() / 255).argmax(1) == labels).float().mean()
    assert accuracy > 0.9 and float(result.loss_sum) / max(1, result.count) < 0.5
