"""A training script for mltask: k-nearest neighbours written with numpy alone.

mltask calls ``fit_and_score`` once per cross-validation fold, on a provider, with one
configuration from the search space. Anything can be tuned this way, not only
scikit-learn estimators: train on (X_train, y_train), score on (X_valid, y_valid), and
return the score (higher is better here: the task says "direction": "maximize"). Returning
the predictions too lets mltask's verifier compare them when it re-runs a fold.
"""

import numpy as np


def fit_and_score(params, X_train, y_train, X_valid, y_valid, seed):
    """Minkowski-distance kNN with uniform or inverse-distance votes; returns (accuracy, predictions)."""
    k, p = int(params["k"]), float(params["p"])
    diffs = np.abs(X_valid[:, None, :] - X_train[None, :, :])
    dist = (diffs ** p).sum(axis=2) ** (1.0 / p)
    nearest = np.argsort(dist, axis=1, kind="stable")[:, :k]
    classes = np.unique(y_train)
    votes = np.zeros((len(X_valid), len(classes)))
    for row, neighbours in enumerate(nearest):
        weights = 1.0 / (dist[row, neighbours] + 1e-12) if params["weighting"] == "distance" else np.ones(k)
        for label, weight in zip(y_train[neighbours], weights, strict=True):
            votes[row, np.searchsorted(classes, label)] += weight
    predictions = classes[votes.argmax(axis=1)]
    return float(np.mean(predictions == y_valid)), predictions
