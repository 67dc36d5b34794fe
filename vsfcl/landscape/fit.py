"""Fit of the inverse variance-flatness relation ``sigma_i^2 ~ F_i^-psi``.

Feng and Tu (PNAS 118, e2015617118, 2021) report that the variance of SGD's weight
fluctuations along a principal direction falls with the flatness of the loss along it,
``sigma_i^2 ~ F_i^-psi`` with ``psi`` near 4 on MNIST. The fit here is ordinary least
squares of ``log sigma_i^2`` on ``log F_i``, so ``psi`` is minus the slope. Its
confidence interval comes from a percentile bootstrap over directions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class VarianceFlatnessFit:
    """Result of :func:`fit_variance_flatness`.

    Attributes
    ----------
    psi : float
        Exponent of ``sigma^2 ~ F^-psi``; minus the least-squares slope.
    psi_ci : tuple of float
        Percentile bootstrap interval of ``psi`` at ``ci_level``; NaN when fewer than
        two bootstrap resamples had spread in ``log F``.
    ci_level : float
    pearson_r : float
        Pearson correlation of ``log sigma^2`` and ``log F`` (negative for an inverse
        relation).
    intercept : float
        Intercept of the fit, ``log sigma^2`` at ``F = 1``.
    used_indices : list of int
        0-based direction indices that entered the fit.
    n_censored : int
        Directions in the index range left out because their flatness is censored
        (NaN), infinite or not positive.
    n_bootstrap : int
        Bootstrap resamples that gave a slope.
    """

    psi: float
    psi_ci: tuple[float, float]
    ci_level: float
    pearson_r: float
    intercept: float
    used_indices: list[int]
    n_censored: int
    n_bootstrap: int


def fit_variance_flatness(
    variances: Tensor,
    flatness: Tensor,
    min_index: int = 1,
    max_index: int | None = None,
    n_bootstrap: int = 1000,
    ci_level: float = 0.95,
    seed: int = 0,
) -> VarianceFlatnessFit:
    """Fit ``log sigma_i^2 = c - psi log F_i`` over directions ``min_index .. max_index``.

    Parameters
    ----------
    variances : Tensor of shape (n_directions,)
        ``sigma_i^2`` of the analysed directions, rank-ordered.
    flatness : Tensor of shape (n_directions,)
        ``F_i``; NaN marks a censored direction, which is excluded and counted.
    min_index, max_index : int
        1-based inclusive range of directions; ``max_index=None`` means the last.
    n_bootstrap : int
        Number of resamples of the used directions, drawn with replacement.
    ci_level : float
        Coverage of the percentile interval, in (0, 1).
    seed : int
        Seed of the bootstrap's random generator.

    Returns
    -------
    VarianceFlatnessFit
    """
    sigma2 = variances.detach().to("cpu", torch.float64).numpy()
    flat = flatness.detach().to("cpu", torch.float64).numpy()
    if sigma2.shape != flat.shape or sigma2.ndim != 1:
        raise ValueError(
            f"variances {sigma2.shape} and flatness {flat.shape} must be 1-D of the same length"
        )
    n_directions = sigma2.shape[0]
    if max_index is None:
        max_index = n_directions
    if not 1 <= min_index <= max_index <= n_directions:
        raise ValueError(
            f"fit range [{min_index}, {max_index}] is invalid for {n_directions} directions; "
            "it needs 1 <= min_index <= max_index <= n_directions"
        )
    if not 0 < ci_level < 1:
        raise ValueError(f"ci_level={ci_level} must be in (0, 1)")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap={n_bootstrap} must be non-negative")

    in_range = np.arange(min_index - 1, max_index)
    valid = np.isfinite(flat[in_range]) & (flat[in_range] > 0) & (sigma2[in_range] > 0)
    used = in_range[valid]
    n_censored = int((~valid).sum())
    if used.shape[0] < 3:
        raise ValueError(
            f"only {used.shape[0]} of the {in_range.shape[0]} directions in "
            f"[{min_index}, {max_index}] have a finite flatness; the fit needs at least 3. "
            "Raise the profile search range (max_offset) or analyse more directions."
        )

    x = np.log(flat[used])
    y = np.log(sigma2[used])
    if np.ptp(x) == 0:
        raise ValueError("every used direction has the same flatness, so the slope is undefined")
    slope, intercept = np.polyfit(x, y, 1)
    pearson_r = float(np.corrcoef(x, y)[0, 1])

    # Percentile bootstrap over directions; resamples without spread in log F are skipped.
    rng = np.random.default_rng(seed)
    slopes = []
    for _ in range(n_bootstrap):
        sample = rng.integers(0, x.shape[0], size=x.shape[0])
        xs = x[sample]
        if np.ptp(xs) == 0:
            continue
        slopes.append(_least_squares_slope(xs, y[sample]))
    if len(slopes) >= 2:
        tail = 100.0 * (1.0 - ci_level) / 2.0
        low, high = np.percentile(-np.asarray(slopes), [tail, 100.0 - tail])
        psi_ci = (float(low), float(high))
    else:
        psi_ci = (math.nan, math.nan)

    return VarianceFlatnessFit(
        psi=float(-slope),
        psi_ci=psi_ci,
        ci_level=float(ci_level),
        pearson_r=pearson_r,
        intercept=float(intercept),
        used_indices=[int(i) for i in used],
        n_censored=n_censored,
        n_bootstrap=len(slopes),
    )


def _least_squares_slope(x: np.ndarray, y: np.ndarray) -> float:
    dx = x - x.mean()
    return float(np.dot(dx, y - y.mean()) / np.dot(dx, dx))
