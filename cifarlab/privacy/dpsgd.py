"""DP-SGD (Abadi et al. 2016) as a transformation of ordinary objects, in the manner of Opacus.

    model = prepare_model(model)                     # BatchNorm -> GroupNorm, or a clear refusal
    optimizer = build_optimizer(model, config.optim)
    private = make_private(model, optimizer, data.train, epochs=30, target_epsilon=8.0, max_grad_norm=1.0)
    fit(private.model, data=replace(data, train=private.loader), variant=private, ...)

Each logical batch is Poisson-sampled by the loader (each example joins independently with
probability q; the size varies and may be 0), split into physical micro-batches, and every
example's gradient, averaged over its `augmult` augmented views (De et al. 2022, arXiv:2204.13650),
is clipped to norm C (cifarlab.privacy.clipping). Opacus's DPOptimizer then adds N(0, sigma^2 C^2)
noise to the clipped sum once per logical batch, divides by the expected batch size q*N, steps, and
reports the step to the accountant. An empty Poisson batch still takes that step, with noise only: the
accountant counts every sampled batch, and the analysis assumes each one releases a noisy sum.
Under torchrun each rank clips its share of the Poisson batch (cifarlab.train.distributed.ShardedLoader) and the
optimizer sums the clipped sums over the ranks with the noise drawn once, on rank 0: every rank takes the step a
single process would take on the whole batch, with the same sample rate, steps and epsilon.
The same machinery with a clipping norm that follows the learning rate is SGLD-DP (cifarlab.uncertainty.sgld_dp).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from opacus.accountants import IAccountant
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn

from cifarlab.config import DEFAULT_ACCOUNTANT, DEFAULT_DATA_NORM_CLIP, DEFAULT_DATA_NORM_NOISE, DEFAULT_DELTA
from cifarlab.data.loader import BatchLoader
from cifarlab.errors import CheckpointError, ConfigError
from cifarlab.models.per_example import prepare_model, privacy_problems
from cifarlab.models.scatter import unfitted_data_norm
from cifarlab.privacy import accounting, datanorm
from cifarlab.privacy.clipping import CLIP_METHODS, check_fast_supported, clipped_grad_sum, trainable_parameters
from cifarlab.train import distributed
from cifarlab.train.variant import StepResult

__all__ = ["ClippedSumOptimizer", "ParamEMA", "PrivateTraining", "make_private", "prepare_model"]

DEFAULT_GRAD_SAMPLE_MODE = "fast"  # benchmarks/dp_speed.py: faster than Opacus hooks and ghost clipping on CPU


class ClippedSumOptimizer(DPOptimizerFastGradientClipping):
    """Opacus's DP optimizer for gradients that arrive already clipped and summed (noise, scaling, accountant
    hook), taking each step's sum without a copy: Opacus deep-copies every `p.grad` into `p.summed_grad` (its
    step: 0.96 vs 0.56-0.72 ms for the `tutorial` LeNet, whose whole DP step is 25 ms, on 2 busy CPU cores).
    `PrivateTraining.step` hands over a fresh tensor per parameter and step, so keeping it aliased is safe.

    Under torchrun it sums the ranks' clipped sums itself (the model is not wrapped in DDP, see `reduces_gradients`),
    as Opacus's DistributedDPOptimizerFastGradientClipping does, but with the noise drawn once per step over the
    whole batch and the sum divided by the global expected batch size q*N."""

    reduces_gradients = True  # cifarlab.train.distributed.wrap_model: no DDP

    def accumulate(self) -> None:
        for p in self.params:
            p.summed_grad = p.grad if p.summed_grad is None else p.summed_grad + p.grad

    def add_noise(self) -> None:
        """p.grad = the clipped sum over all ranks + N(0, sigma^2 C^2): rank 0 alone adds the noise before the sum,
        so a step holds one draw of it, as in a single process (noise on every rank would make it sqrt(ranks)
        times larger). scale_grad then divides by q*N, the whole batch's expected size, on every rank alike."""
        ranks = distributed.context()
        if ranks.is_main:
            super().add_noise()
        else:
            for p in self.params:
                p.grad = p.summed_grad.view_as(p)
        if ranks.world_size > 1:
            for p in self.params:
                dist.all_reduce(p.grad)


class ParamEMA:
    """Exponential moving average of the weights, for evaluation (Polyak & Juditsky 1992; used for DP-SGD by
    De et al. 2022). The decay warms up as min(decay, (1 + t) / (10 + t)), TensorFlow's ExponentialMovingAverage
    schedule, so early averages are not dominated by the random initialisation."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ConfigError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        averaged = self.model.state_dict()
        for name, value in model.state_dict().items():
            if averaged[name].device != value.device:
                self.model.to(value.device)
                averaged = self.model.state_dict()
            if value.is_floating_point():
                averaged[name].lerp_(value, 1 - decay)
            else:
                averaged[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


@dataclass
class PrivateTraining:
    """DP-SGD as a training variant (cifarlab.train.variant): the private versions of model, optimizer and loader,
    the accountant, and the batch step.

    `clip_norm_for_lr`: None for a fixed clipping norm; else C as a function of the learning rate, recomputed every
    step (SGLD-DP, Li et al. 2019), and the fraction of clipped gradients joins the epoch's metrics.
    """

    model: nn.Module
    optimizer: ClippedSumOptimizer
    loader: BatchLoader
    accountant: IAccountant
    accountant_name: str
    noise_multiplier: float
    delta: float
    sample_rate: float
    poisson: bool
    augmult: int
    physical_batch_size: int | None
    grad_sample_mode: str
    target_epsilon: float | None = None
    ema: ParamEMA | None = None
    prior: tuple[accounting.Release, ...] = ()  # releases before training (data normalisation), in the accountant
    clip_norm_for_lr: Callable[[float], float] | None = None
    epsilon_history: list[float] = field(default_factory=list)
    # Per-example gradients clipped and seen so far (a tensor: counting needs no device sync). Under torchrun this
    # rank's counts since the last epoch end, plus the totals before it on rank 0 (_gather_counts).
    clipped: torch.Tensor | int = 0
    examples: int = 0

    @property
    def max_grad_norm(self) -> float:
        """C, the clipping norm (the current one when it follows the learning rate)."""
        return self.optimizer.max_grad_norm

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """One DP-SGD step on a logical batch: x (B * augmult, ...) with each example's views adjacent, y likewise.

        B may be 0 (Poisson sampling): the step then adds noise only, as the analysis assumes.
        """
        if self.clip_norm_for_lr is not None:
            self.optimizer.max_grad_norm = self.clip_norm_for_lr(self.optimizer.param_groups[0]["lr"])
        views = self.augmult
        params = trainable_parameters(model)
        sums = None
        loss_sum, correct = torch.zeros((), device=y.device), torch.zeros((), dtype=torch.long, device=y.device)
        rows = (self.physical_batch_size or max(1, len(y) // views)) * views
        for xs, ys in zip(x.split(rows), y.split(rows)):
            if len(ys) == 0:
                continue
            with warnings.catch_warnings():  # grad_sample_mode hooks: the first layer's input needs no gradient
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                result = clipped_grad_sum(model, xs, ys, max_grad_norm=self.max_grad_norm, views=views,
                                          method=self.grad_sample_mode)
            sums = result.grads if sums is None else [s + g for s, g in zip(sums, result.grads)]
            loss_sum = loss_sum + result.losses.sum()
            correct = correct + (result.logits.argmax(1) == ys[::views]).sum()
            self.clipped = self.clipped + (result.norms > self.max_grad_norm).sum()
        for p, s in zip(params, sums or [torch.zeros_like(p) for p in params]):  # an empty batch: noise only
            p.grad = s
        self.optimizer.step()  # + N(0, sigma^2 C^2), / (q N), the update, accountant.step
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(model)
        self.examples += len(y) // views
        return StepResult(loss_sum.detach(), correct, len(y) // views)

    @property
    def steps(self) -> int:
        """DP-SGD steps taken (the prior releases are not steps)."""
        return sum(steps for _, _, steps in self.accountant.history) - sum(steps for _, _, steps in self.prior)

    def epsilon(self) -> float:
        return accounting.accountant_epsilon(self.accountant, self.delta)

    def clipped_fraction(self) -> float:
        """Share of per-example gradients clipped so far, over all ranks (under torchrun a call every rank makes);
        for SGLD-DP, where it is not ~0 the run is not SGLD."""
        clipped, examples = distributed.all_reduce_sums(self.clipped, self.examples)
        return float(clipped) / max(1, examples)

    def _gather_counts(self) -> None:
        """Under torchrun: the clipping counts summed onto rank 0 and restarted on the others, so that rank 0's state,
        which last.pt holds and every rank resumes from (load_state_dict), carries the run's totals."""
        ranks = distributed.context()
        if ranks.world_size > 1:
            clipped, examples = distributed.all_reduce_sums(self.clipped, self.examples)
            self.clipped, self.examples = (int(clipped), int(examples)) if ranks.is_main else (0, 0)

    def on_epoch_end(self, epoch: int, model: nn.Module) -> dict[str, float]:
        """The epoch's row of metrics.csv gets the epsilon spent so far."""
        self._gather_counts()
        self.epsilon_history.append(self.epsilon())
        row = {"epsilon": self.epsilon_history[-1]}
        if self.clip_norm_for_lr is not None:
            row["clipped_fraction"] = self.clipped_fraction()
        return row

    @property
    def eval_model(self) -> nn.Module | None:
        """The weights to evaluate and release: the EMA copy when enabled (None: the trained model)."""
        return self.ema.model if self.ema is not None else None

    def summary(self) -> dict[str, Any]:
        """The run's privacy facts, for summary.json."""
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sample_rate,
            "steps": self.steps,
            "poisson": self.poisson,
            "accountant": self.accountant_name,
            "target_epsilon": self.target_epsilon,
            "max_grad_norm": self.max_grad_norm,
            "expected_batch_size": self.optimizer.expected_batch_size,
            "augmult": self.augmult,
            "ema": self.ema.decay if self.ema is not None else None,
            "grad_sample_mode": self.grad_sample_mode,
            "data_norm_noise": self.prior[0][0] if self.prior else None,
        }

    def state_dict(self) -> dict[str, Any]:
        """For checkpoints and resume: the accountant's history, the clipping counts (and the EMA weights)."""
        # The history and the mechanism's name, not Opacus's own state_dict: before Opacus 1.6 that held the
        # mechanism as a bound method, which weights_only loading refuses.
        accountant = {"history": [tuple(entry) for entry in self.accountant.history],
                      "mechanism": self.accountant.mechanism()}
        state: dict[str, Any] = {"accountant": accountant,
                                 "epsilon_history": list(self.epsilon_history),
                                 "clipped": int(self.clipped), "examples": self.examples}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["accountant"]
        if saved["mechanism"] != self.accountant.mechanism():
            raise CheckpointError(f"the checkpoint's privacy accounting used the {saved['mechanism']!r} accountant, "
                                  f"this run uses {self.accountant.mechanism()!r}; resume with the same accountant")
        self.accountant.history = [tuple(entry) for entry in saved["history"]]
        self.epsilon_history = list(state["epsilon_history"])
        self.clipped, self.examples = (state["clipped"], state["examples"]) if distributed.context().is_main else (0, 0)
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, loader: BatchLoader, *, epochs: int,
                 max_grad_norm: float | Callable[[float], float], noise_multiplier: float | None = None,
                 target_epsilon: float | None = None,
                 delta: float = DEFAULT_DELTA, accountant: str = DEFAULT_ACCOUNTANT,
                 poisson: bool = True, augmult: int = 1, physical_batch_size: int | None = None,
                 ema: float | None = None, grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
                 data_norm_noise: float = DEFAULT_DATA_NORM_NOISE,
                 data_norm_clip: float = DEFAULT_DATA_NORM_CLIP) -> PrivateTraining:
    """Wrap `optimizer` (built over `model`, itself from prepare_model) and re-sample `loader` for DP-SGD.

    `max_grad_norm`: the clipping norm C, or C as a function of the learning rate (SGLD-DP's, recomputed every step).
    Give `noise_multiplier`, or `target_epsilon` to solve for it over `epochs` epochs. A model with data
    normalisation gets its statistics from `loader` here, privately (`data_norm_*`, see privacy.datanorm), and the
    accountant counts that release; otherwise the inputs are not changed.
    """
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ConfigError("give exactly one of noise_multiplier and target_epsilon")
    if grad_sample_mode not in CLIP_METHODS:
        raise ConfigError(f"unknown grad_sample_mode {grad_sample_mode!r}; valid: {', '.join(CLIP_METHODS)}")
    clip_norm_for_lr = max_grad_norm if callable(max_grad_norm) else None
    if clip_norm_for_lr is not None:
        max_grad_norm = clip_norm_for_lr(optimizer.param_groups[0]["lr"])
    if max_grad_norm <= 0 or augmult < 1 or epochs < 1 or (physical_batch_size is not None and physical_batch_size < 1):
        raise ConfigError(f"need max_grad_norm > 0, augmult >= 1, epochs >= 1, physical_batch_size >= 1; got "
                          f"{max_grad_norm}, {augmult}, {epochs}, {physical_batch_size}")
    accounting.check_delta(delta, loader.num_examples)
    problems = privacy_problems(model)
    if problems or hasattr(model, "init_from_data"):
        raise ConfigError("the model has layers DP-SGD cannot train (e.g. BatchNorm); pass it through "
                          "cifarlab.privacy.prepare_model first")
    if grad_sample_mode == "fast":
        check_fast_supported(model)
    params = trainable_parameters(model)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if in_optimizer != {id(p) for p in params}:
        raise ConfigError("the optimizer must hold exactly the model's trainable parameters "
                          "(build it after prepare_model, from the prepared model)")
    if not poisson:
        warnings.warn("DP-SGD without Poisson sampling: batches are shuffled, so the reported epsilon (which assumes "
                      "Poisson sampling) is not a formal guarantee for this run", stacklevel=2)
    if getattr(loader.preprocess, "kind", "none") != "none":
        warnings.warn(f"the input preprocessing ({loader.preprocess.kind}) was fitted on the private training images "
                      "outside DP-SGD; use data.preprocess 'none' for an end-to-end guarantee", stacklevel=2)

    private_loader = loader.replace(sampling="poisson" if poisson else "shuffle", views=augmult, drop_last=False)
    sample_rate = private_loader.sample_rate
    prior = ()
    if unfitted_data_norm(model):
        prior = (datanorm.fit_data_norm(model, loader, noise_multiplier=data_norm_noise, clip=data_norm_clip),)
    if target_epsilon is not None:
        noise_multiplier = accounting.noise_for_target_epsilon(
            target_epsilon, delta=delta, sample_rate=sample_rate, steps=epochs * len(private_loader),
            accountant=accountant, prior=prior)
    elif noise_multiplier <= 0:
        raise ConfigError(f"noise_multiplier must be > 0 for DP-SGD, got {noise_multiplier}")
    acc = accounting.create_accountant(accountant)
    acc.history = list(prior)
    dp_optimizer = ClippedSumOptimizer(
        optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=max(1, round(sample_rate * loader.num_examples)), loss_reduction="mean")
    dp_optimizer.attach_step_hook(acc.get_optimizer_hook_fn(sample_rate=sample_rate))
    return PrivateTraining(
        model=model, optimizer=dp_optimizer, loader=private_loader, accountant=acc, accountant_name=accountant,
        noise_multiplier=float(noise_multiplier), delta=delta, sample_rate=sample_rate, poisson=poisson,
        augmult=augmult, physical_batch_size=physical_batch_size, grad_sample_mode=grad_sample_mode,
        clip_norm_for_lr=clip_norm_for_lr, target_epsilon=target_epsilon,
        ema=ParamEMA(model, ema) if ema is not None else None, prior=prior)
