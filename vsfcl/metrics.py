"""Continual-learning summaries of an accuracy matrix.

``R[i, j]`` is the test accuracy on experience ``j`` after training on experience
``i``. With ``T`` rows (Lopez-Paz and Ranzato, 2017; Chaudhry et al., 2018):

- average accuracy ``ACC = mean_j R[T-1, j]``;
- backward transfer ``BWT = mean_{j < T-1} (R[T-1, j] - R[j, j])``, negative when
  the model forgets;
- forgetting ``mean_{j < T-1} (max_{l < T-1} R[l, j] - R[T-1, j])``.
"""

from __future__ import annotations

import numpy as np


def average_accuracy(matrix: np.ndarray) -> float:
    """Return the mean of the last row."""
    return float(np.mean(matrix[-1]))


def backward_transfer(matrix: np.ndarray) -> float | None:
    """Return BWT, or None when the matrix is not square with at least two rows."""
    n_rows, n_cols = matrix.shape
    if n_rows != n_cols or n_rows < 2:
        return None
    last = n_rows - 1
    return float(np.mean([matrix[last, j] - matrix[j, j] for j in range(last)]))


def forgetting(matrix: np.ndarray) -> float | None:
    """Return the mean forgetting, or None when the matrix is not square with at least two rows."""
    n_rows, n_cols = matrix.shape
    if n_rows != n_cols or n_rows < 2:
        return None
    last = n_rows - 1
    return float(np.mean([matrix[j:last, j].max() - matrix[last, j] for j in range(last)]))
