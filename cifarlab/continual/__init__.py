"""Class-incremental learning without retraining: Gaussian (Mahalanobis) classifiers on frozen features.

transforms.py (l2, tukey) -> stats.py (sufficient statistics) -> classifiers.py (lda, qda-shrink, ncm, slda)
-> novelty.py (novelty scores) ; state.py (saved state, adding a class from a folder) ; features.py (frozen
backbone) ; protocol.py (base training, increments, baselines, metrics.py, plots.py).
"""
