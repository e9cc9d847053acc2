"""Linear probe on the vision features before the projector (SPEC §6), with scikit-learn.

Features are standardized (mean/std of the training set), then a multinomial
:class:`sklearn.linear_model.LogisticRegression` (L-BFGS) is fit. The inverse regularization ``C`` is chosen
on a held-out fifth of the training set from ``c_grid`` (CLIP paper, appendix A.3, sweeps C the same way),
then the model is refit on the whole training set.
"""

from __future__ import annotations

import logging

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from eval.benchmarks.base import BenchmarkError
from eval.metrics import ClassificationOutcome, classification_metrics

log = logging.getLogger(__name__)

C_GRID = (0.01, 0.1, 1.0, 10.0)


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int, seed: int) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=max_iter, random_state=seed).fit(x, y)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 n_classes: int, c_grid: tuple[float, ...] = C_GRID, max_iter: int = 1000,
                 seed: int = 0) -> tuple[ClassificationOutcome, float]:
    """Fit on ``train`` features, score ``test`` with :func:`eval.metrics.classification_metrics`.

    Args:
        train_x, test_x: ``float [N, width]`` pre-projector features.
        train_y, test_y: ``int [N]`` class indices in ``[0, n_classes)``.
        n_classes: C (classes absent from training get probability 0 and are never predicted).
        c_grid: candidate inverse regularization strengths; one value skips the selection.
        max_iter: L-BFGS iterations.
        seed: split / solver seed.

    Returns:
        the outcome on the test set and the chosen ``C``.

    Raises:
        eval.benchmarks.base.BenchmarkError: fewer than two classes in the training labels.
    """
    train_y = np.asarray(train_y, np.int64)
    if len(np.unique(train_y)) < 2:
        raise BenchmarkError("linear probe needs at least two classes in the training set")
    scaler = StandardScaler().fit(train_x)
    xtr, xte = scaler.transform(train_x), scaler.transform(test_x)
    best_c = c_grid[0]
    if len(c_grid) > 1:
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(xtr))
        n_val = max(1, len(xtr) // 5)
        val, fit = perm[:n_val], perm[n_val:]
        accs = [(_fit(xtr[fit], train_y[fit], c, max_iter, seed).score(xtr[val], train_y[val]), -i)
                for i, c in enumerate(c_grid)]
        best_c = c_grid[-max(accs)[1]]
        log.info("linear probe: C=%s chosen on %d held-out training images (accuracies %s)", best_c, n_val,
                 [round(a, 4) for a, _ in accs])
    clf = _fit(xtr, train_y, best_c, max_iter, seed)
    scores = np.full((len(xte), n_classes), -np.inf)
    scores[:, clf.classes_] = clf.predict_log_proba(xte)
    return classification_metrics(scores, np.asarray(test_y, np.int64)), best_c
