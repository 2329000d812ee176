"""The baselines SGLD is compared with: MC dropout, deep ensembles, and post-hoc temperature scaling.

- MC dropout (Gal & Ghahramani 2016, arXiv:1506.02142): keep dropout on at test time, average T passes.
- Deep ensembles (Lakshminarayanan et al. 2017, arXiv:1612.01474): M networks from different seeds, averaged;
  a list of their state_dicts predicts like SGLD samples (`sgld.predict_posterior`).
- Temperature scaling (Guo et al. 2017, arXiv:1706.04599): one scalar T fitted on held-out data.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cifarlab.errors import ConfigError

_TINY = 1e-12


def dropout_layers(model: nn.Module) -> list[nn.Module]:
    """The model's dropout modules with p > 0."""
    kinds = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
    return [m for m in model.modules() if isinstance(m, kinds) and m.p > 0]


@torch.no_grad()
def mc_dropout_outputs(model: nn.Module, x: Tensor, *, passes: int, batch_size: int = 1000) -> Tensor:
    """Outputs of `passes` stochastic forward passes, (T, N, ...): dropout on, batch norm in eval mode.

    Masks come from torch's global generator (seed it for reproducible results). The model's train/eval
    modes are restored afterwards.
    """
    layers = dropout_layers(model)
    if not layers:
        raise ConfigError(
            f"MC dropout needs dropout layers, and {type(model).__name__} has none with p > 0; "
            "use a model with dropout (e.g. cnn, vgg, or wrn with model.args.dropout > 0)"
        )
    if passes < 1:
        raise ConfigError(f"MC dropout passes must be >= 1, got {passes}")
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for layer in layers:
            layer.train()
        return torch.stack([torch.cat([model(chunk) for chunk in x.split(batch_size)]) for _ in range(passes)])
    finally:
        for module, training in modes.items():
            module.train(training)


def predict_mc_dropout(model: nn.Module, x: Tensor, *, passes: int, batch_size: int = 1000) -> Tensor:
    """MC dropout predictive distribution: mean over passes of softmax, (N, K)."""
    return mc_dropout_outputs(model, x, passes=passes, batch_size=batch_size).softmax(dim=-1).mean(dim=0)


def temperature_scale(probs: Tensor, temperature: float) -> Tensor:
    """softmax(log p / T): for a single network the same as softmax(logits / T), and defined for averaged p."""
    return (probs.double().clamp_min(_TINY).log() / temperature).softmax(dim=1).to(probs.dtype)


def fit_temperature(probs: Tensor, labels: Tensor, *, max_iter: int = 100) -> float:
    """The T > 0 that minimises the NLL of temperature_scale(probs, T) on held-out (validation) data.

    Optimised over log T with L-BFGS (as Guo et al.), so T stays positive without constraints.
    """
    if probs.dim() != 2 or labels.shape != (probs.shape[0],) or len(labels) == 0:
        raise ValueError(f"expected probs (N, K) and labels (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}")
    log_p = probs.detach().double().clamp_min(_TINY).log().cpu()
    labels = labels.long().cpu()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(log_p / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return log_t.exp().item()
