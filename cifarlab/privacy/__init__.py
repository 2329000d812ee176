"""Differentially private training: DP-SGD through Opacus with honest accounting, and a membership audit.

- accounting: epsilon spent, noise for a target epsilon (Opacus's PRV and RDP accountants)
- clipping: per-example clipped gradient sums (fast single-pass path, or Opacus hooks)
- dpsgd: prepare_model / make_private -> PrivateTraining (a training variant: step, on_epoch_end, summary), ParamEMA
- datanorm: a model's data-normalisation statistics, released once privately before DP-SGD
- audit: loss-threshold membership inference (attack AUC) on a checkpoint
"""
from cifarlab.privacy.accounting import epsilon, noise_for_target_epsilon
from cifarlab.privacy.dpsgd import ParamEMA, PrivateTraining, make_private, prepare_model

__all__ = ["ParamEMA", "PrivateTraining", "epsilon", "make_private", "noise_for_target_epsilon", "prepare_model"]
