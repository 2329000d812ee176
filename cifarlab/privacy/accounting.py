"""Privacy accounting for DP-SGD: epsilon spent, and the noise needed for a target epsilon.

Both accountants come from Opacus and analyse the Poisson-subsampled Gaussian mechanism:
- "rdp": Renyi DP of the sampled Gaussian (Mironov, Talwar & Zhang 2019) converted to
  (epsilon, delta) with Balle et al. 2020, Thm 21. Always computable, a little loose.
- "prv": numerical composition of privacy loss random variables (Gopi, Lee & Wutschitz 2021).
  Returns an upper bound within `eps_error` (0.01) of the exact epsilon.

A run may release something once before training (DP data normalisation: one Gaussian mechanism over the whole
training set, q = 1); such `prior` releases, in Opacus's history format (noise_multiplier, sample_rate, steps), are
composed with the DP-SGD steps by the same accountant, and the noise solve for a target epsilon leaves room for them.

Default "prv": it is the tighter of the two (e.g. q=4096/50000, sigma=3, 2500 steps,
delta=1e-5: 6.59 vs 7.10 for RDP, which buys less noise for the same target) and its result
is still a certified upper bound. Its one known instability is a discretisation failure
for large epsilons (github.com/pytorch/opacus/issues/601 and /604); there we fall back to RDP, which is always a
valid (looser) bound, and say so once.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant

from cifarlab.config import DEFAULT_ACCOUNTANT
from cifarlab.errors import ConfigError

# The class behind each name of config.ACCOUNTANTS (config validates names without importing Opacus).
ACCOUNTANTS: dict[str, type[IAccountant]] = {"prv": PRVAccountant, "rdp": RDPAccountant}
EPSILON_TOLERANCE = 0.01  # the noise solve stops within this much below the target, as Opacus's does
Release = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps): one line of an Opacus accountant history


def create_accountant(name: str = DEFAULT_ACCOUNTANT) -> IAccountant:
    """A fresh Opacus accountant by name ("prv" or "rdp")."""
    if name not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant {name!r}; valid: {', '.join(sorted(ACCOUNTANTS))}")
    return ACCOUNTANTS[name]()


def check_delta(delta: float, dataset_size: int) -> None:
    """delta must be well below 1/N: delta >= 1/N allows releasing one whole example."""
    if not 0 < delta < 1.0 / dataset_size:
        raise ConfigError(
            f"delta={delta:g} must be in (0, 1/N) = (0, {1.0 / dataset_size:.3g}) for N={dataset_size} "
            f"training examples; the usual choice is 1e-5 or smaller")


def accountant_epsilon(accountant: IAccountant, delta: float) -> float:
    """Epsilon spent by the steps recorded in `accountant` (0 before the first step)."""
    if not accountant.history:
        return 0.0
    try:
        with np.errstate(divide="ignore"), warnings.catch_warnings():  # PRV takes log(1 - q) = log(0) for q = 1
            if isinstance(accountant, PRVAccountant):
                # PRV sizes its discretisation domain with an RDP bound of one step at a tiny delta, whose best
                # order is often the largest Opacus tries: the domain is then wider than needed (time, not validity).
                warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(accountant.get_epsilon(delta=delta))
    except RuntimeError as err:  # PRV discretisation failure, see module docstring
        if not isinstance(accountant, PRVAccountant):
            raise
        warnings.warn(f"PRV accountant failed ({err}); reporting the (looser) RDP epsilon instead",
                      stacklevel=2)
        rdp = RDPAccountant()
        rdp.history = list(accountant.history)
        return float(rdp.get_epsilon(delta=delta))


def epsilon(*, sample_rate: float, noise_multiplier: float, steps: int, delta: float,
            accountant: str = DEFAULT_ACCOUNTANT, prior: Sequence[Release] = ()) -> float:
    """Epsilon after the `prior` releases and `steps` DP-SGD steps with Poisson rate q and noise multiplier sigma."""
    history = [*prior, (noise_multiplier, sample_rate, steps)]
    for release in history:
        _check_mechanism(*release)
    acc = create_accountant(accountant)
    acc.history = [release for release in history if release[2] > 0]
    return accountant_epsilon(acc, delta)


def noise_for_target_epsilon(target_epsilon: float, *, delta: float, sample_rate: float, steps: int,
                             accountant: str = DEFAULT_ACCOUNTANT, prior: Sequence[Release] = ()) -> float:
    """Smallest noise multiplier (to a 0.01-epsilon bisection) whose epsilon, with the `prior` releases, <= target."""
    _check_mechanism(1.0, sample_rate, steps)
    if not 0 < target_epsilon < math.inf:
        raise ConfigError(f"target_epsilon={target_epsilon:g} must be a positive number")
    create_accountant(accountant)  # validates the name
    try:
        sigma = _solve(target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant,
                       prior=prior)
    except RuntimeError as err:
        if accountant != "prv":
            raise
        warnings.warn(f"PRV accountant failed ({err}); solving for the noise with RDP instead",
                      stacklevel=2)
        accountant = "rdp"
        sigma = _solve(target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant,
                       prior=prior)
    except ValueError as err:
        raise ConfigError(f"target_epsilon={target_epsilon:g} is unreachable for q={sample_rate:g}, {steps} steps, "
                          f"delta={delta:g}{f' after the releases {list(prior)}' if prior else ''} ({err})") from err
    spent = epsilon(sample_rate=sample_rate, noise_multiplier=sigma, steps=steps, delta=delta,
                    accountant=accountant, prior=prior)
    if spent > target_epsilon:  # a guarantee, so checked even under python -O
        raise RuntimeError(f"noise solve ended above target: epsilon {spent} > {target_epsilon}")
    return float(sigma)


def _solve(target_epsilon: float, *, delta: float, sample_rate: float, steps: int, accountant: str,
           prior: Sequence[Release]) -> float:
    """Bisection on sigma (epsilon falls as sigma grows) until target - EPSILON_TOLERANCE < epsilon <= target.

    Written here rather than calling Opacus's get_noise_multiplier, which accounts for the DP-SGD steps alone."""
    def spent(sigma: float) -> float:
        return epsilon(sample_rate=sample_rate, noise_multiplier=sigma, steps=steps, delta=delta,
                       accountant=accountant, prior=prior)

    with warnings.catch_warnings():
        # The bisection tries very large noise levels whose best RDP order is the largest one; that notice
        # is irrelevant to the solution (the final epsilon is recomputed, and warns, outside this block).
        warnings.filterwarnings("ignore", message="Optimal order is the")
        low, high = 0.0, 10.0
        while (high_epsilon := spent(high)) > target_epsilon:
            low, high = high, 2 * high
            if high > 1e4:
                raise ValueError("the budget is too low even with noise multiplier 10,000")
        while high_epsilon < target_epsilon - EPSILON_TOLERANCE and high - low > 1e-6:
            middle = (low + high) / 2
            if (middle_epsilon := spent(middle)) > target_epsilon:
                low = middle
            else:
                high, high_epsilon = middle, middle_epsilon
        return high


def _check_mechanism(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if noise_multiplier <= 0:
        raise ConfigError(f"noise_multiplier={noise_multiplier:g} must be > 0 (0 gives no privacy)")
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample_rate={sample_rate:g} must be in (0, 1] (expected batch / N)")
    if steps < 0:
        raise ConfigError(f"steps={steps} must be >= 0")
