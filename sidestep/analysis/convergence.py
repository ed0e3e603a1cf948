"""Rank correlation and the convergence rule of the Fisher estimate (docs/algorithm.md §3).

A run has converged when the Spearman correlation between the current module ranking and
the one `patience` batches earlier stays at or above `threshold` for `patience` consecutive checks.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Sequence

import numpy as np
from scipy.stats import spearmanr

__all__ = ["ConvergenceTracker", "mean_pairwise_spearman", "spearman"]


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman's rho of two equally long vectors (`scipy.stats.spearmanr`, ties averaged).

    When a vector is constant its ranking carries no order: two constant vectors count as identical
    rankings (1.0), a constant against a varying one as unrelated (0.0); scipy gives NaN there, which
    the convergence rule cannot compare.
    """
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"spearman needs vectors of the same length, got {x.size} and {y.size}.")
    if x.size < 2:
        return 1.0
    flat_x, flat_y = bool(np.all(x == x[0])), bool(np.all(y == y[0]))
    if flat_x or flat_y:
        return 1.0 if flat_x and flat_y else 0.0
    return float(spearmanr(x, y).statistic)


def mean_pairwise_spearman(estimates: Sequence[Sequence[float] | np.ndarray]) -> float | None:
    """Mean Spearman over every pair of run estimates: a reproducibility figure; None with fewer than 2 runs."""
    if len(estimates) < 2:
        return None
    values = [spearman(a, b) for a, b in itertools.combinations(estimates, 2)]
    return float(np.mean(values))


class ConvergenceTracker:
    """Feed one score vector per batch; says when the ranking has been stable long enough.

    Args:
        patience: compare with the estimate this many batches earlier, and require this many passing checks in a row.
        threshold: the Spearman correlation a check must reach.
    """

    def __init__(self, patience: int, threshold: float) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}.")
        self.patience = patience
        self.threshold = threshold
        self._history: deque[np.ndarray] = deque(maxlen=patience + 1)
        self.streak = 0
        self.last: float | None = None
        self.converged = False

    def update(self, scores: Sequence[float] | np.ndarray) -> bool:
        """Record this batch's estimate; returns True once the run has converged."""
        self._history.append(np.asarray(scores, dtype=np.float64).copy())
        if len(self._history) > self.patience:
            self.last = spearman(self._history[-1], self._history[0])
            self.streak = self.streak + 1 if self.last >= self.threshold else 0
            self.converged = self.converged or self.streak >= self.patience
        return self.converged
