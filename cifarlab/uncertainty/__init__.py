"""Predictive uncertainty: SGLD posterior sampling, compared with MC dropout, deep ensembles and temperature scaling.

- metrics.py: accuracy, NLL, Brier, ECE, predictive entropy, OOD AUROC, reliability bins (pure functions).
- sgld.py: the SGLD optimizer, step-size decay, burn-in/thinning sample collection, posterior prediction.
- sgld_dp.py: DP-SGD with Li et al.'s clipping norm, which is SGLD while clipping is inactive.
- baselines.py: MC dropout, temperature scaling (ensembles predict like posterior samples).
- sine.py: the 1-D regression demonstration (std in the gap between two data ranges).
- ood.py: held-out classes and corruptions at 5 severities, made from CIFAR itself.
- evaluate.py: all metrics and plots for any predictive distribution; train.py: training runs with the engine.
"""
