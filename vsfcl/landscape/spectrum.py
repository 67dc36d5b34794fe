"""Statistics of the rank-ordered PCA variance spectrum of a trajectory.

Definitions (Feng and Tu, PNAS 118, e2015617118, 2021), with ``sigma_i^2`` the
variance of the i-th principal component, ranked so that ``sigma_1^2`` is largest
and indices counted from 1:

- power law: ``sigma_i^2 ~ i^-gamma`` over an index range, fitted by least squares on
  ``log sigma_i^2`` against ``log i``;
- cumulative variance excluding the first component:
  ``C(n) = sum_{i=2..n} sigma_i^2 / sum_{i=2..N} sigma_i^2`` where N runs over every
  component of the trajectory, so ``C(n)`` is the share of the non-drift variance
  held by the top ``n - 1`` components after ``p_1``;
- ``n90``: the smallest n with ``C(n) >= 0.9``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class PowerLawFit:
    """Least-squares fit of ``log sigma_i^2 = log A - gamma log i``.

    Attributes
    ----------
    gamma : float
        Decay exponent (positive for a decaying spectrum).
    amplitude : float
        Prefactor A, in the units of the variances.
    min_index, max_index : int
        First and last 1-based index used, inclusive.
    r_squared : float
        Coefficient of determination of the fit in log-log space.
    gamma_stderr : float
        Standard error of gamma from the residuals; it assumes independent errors,
        which neighbouring spectral values are not, so treat it as a lower bound.
    """

    gamma: float
    amplitude: float
    min_index: int
    max_index: int
    r_squared: float
    gamma_stderr: float


def fit_power_law(
    variances: Tensor, min_index: int = 20, max_index: int | None = None
) -> PowerLawFit:
    """Fit ``sigma_i^2 ~ A i^-gamma`` over ``min_index <= i <= max_index``.

    Parameters
    ----------
    variances : Tensor of shape (n_components,)
        Rank-ordered variances ``sigma_1^2 >= sigma_2^2 >= ...``.
    min_index, max_index : int
        1-based inclusive index range; ``max_index=None`` means the last component.
        Components with zero variance inside the range are dropped, because the
        logarithm is undefined there.

    Returns
    -------
    PowerLawFit
    """
    values = variances.detach().to("cpu", torch.float64).numpy()
    n_components = values.shape[0]
    if max_index is None:
        max_index = n_components
    if not 1 <= min_index < max_index:
        raise ValueError(
            f"fit range [{min_index}, {max_index}] is invalid: it needs 1 <= min_index < max_index"
        )
    if max_index > n_components:
        raise ValueError(
            f"max_index={max_index} exceeds the {n_components} available components; "
            "lower the fit's max_index or keep more PCA components"
        )
    index = np.arange(min_index, max_index + 1)
    selected = values[min_index - 1 : max_index]
    positive = selected > 0
    if positive.sum() < 3:
        raise ValueError(
            f"only {int(positive.sum())} positive variances in [{min_index}, {max_index}]; "
            "a power-law fit needs at least 3"
        )
    x = np.log(index[positive])
    y = np.log(selected[positive])
    slope, intercept = np.polyfit(x, y, 1)
    residuals = y - (slope * x + intercept)
    total = np.sum((y - y.mean()) ** 2)
    r_squared = 1.0 - float(np.sum(residuals**2) / total) if total > 0 else 1.0
    n_points = x.shape[0]
    if n_points > 2:
        stderr = math.sqrt(np.sum(residuals**2) / (n_points - 2) / np.sum((x - x.mean()) ** 2))
    else:
        stderr = math.nan
    return PowerLawFit(
        gamma=float(-slope),
        amplitude=float(math.exp(intercept)),
        min_index=int(min_index),
        max_index=int(max_index),
        r_squared=r_squared,
        gamma_stderr=stderr,
    )


def cumulative_variance_excluding_first(variances: Tensor, total_variance: float) -> Tensor:
    """Compute ``C(n)`` for ``n = 2 .. n_components``.

    Parameters
    ----------
    variances : Tensor of shape (n_components,)
        Rank-ordered variances; may be the leading part of the spectrum only.
    total_variance : float
        Sum of all the trajectory's variances, kept or not, so that a truncated
        spectrum still gets the exact denominator.

    Returns
    -------
    Tensor of shape (n_components - 1,), float64
        Entry ``k`` is ``C(k + 2)``.
    """
    values = variances.detach().to("cpu", torch.float64)
    if values.shape[0] < 2:
        raise ValueError("the cumulative variance excluding i = 1 needs at least 2 components")
    remainder = float(total_variance) - float(values[0])
    if not remainder > 0:
        raise ValueError(
            f"total_variance={total_variance!r} leaves no variance beyond the first component "
            f"(sigma_1^2 = {float(values[0])!r})"
        )
    return torch.cumsum(values[1:], dim=0) / remainder


def components_to_fraction(
    variances: Tensor, total_variance: float, fraction: float = 0.9
) -> int | None:
    """Return the smallest n with ``C(n) >= fraction``, or None if the kept spectrum falls short.

    A None result means the leading components passed in do not reach the fraction;
    keep more PCA components to resolve it.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    cumulative = cumulative_variance_excluding_first(variances, total_variance)
    # A tolerance absorbs rounding when the whole spectrum is passed and fraction is 1.
    reached = torch.nonzero(cumulative >= fraction - 1e-12).flatten()
    if reached.numel() == 0:
        return None
    return int(reached[0]) + 2


@dataclass(frozen=True)
class DriftStatistics:
    """Drift of the first principal coordinate and alignment of ``p_1`` with ``<w>_T``.

    Attributes
    ----------
    theta1_displacement_ratio : float
        ``|theta_1(end) - theta_1(start)| / std(theta_1)`` over the window.
    other_displacement_ratio_median : float
        Median of the same ratio over components 2 .. k, for comparison; NaN when
        there is no second component.
    p1_mean_alignment : float
        ``|cos|`` of the angle between ``p_1`` and ``<w>_T``.
    random_alignment_scale : float
        ``sqrt(2 / (pi n_params))``, the mean ``|cos|`` of a random direction with a
        fixed vector in ``n_params`` dimensions (large-n limit), as a reference.
    weight_norm_change : float
        ``||w(end)|| - ||w(start)||`` of the recorded entries, in weight units.
    """

    theta1_displacement_ratio: float
    other_displacement_ratio_median: float
    p1_mean_alignment: float
    random_alignment_scale: float
    weight_norm_change: float


def drift_statistics(
    projections: Tensor, directions: Tensor, mean: Tensor, snapshots: Tensor
) -> DriftStatistics:
    """Measure how strongly ``theta_1`` drifts and how ``p_1`` aligns with ``<w>_T``.

    For a linear drift the displacement ratio is ``sqrt(12)`` (about 3.46). The first
    principal coordinate of a pure random walk also gives a ratio near 3 (its shape is
    close to a half cosine), so the ratio alone does not separate drift from
    diffusion. The alignment of ``p_1`` with ``<w>_T``, far above the random scale, is
    the stronger sign that the drift inflates the weights.

    Parameters
    ----------
    projections : Tensor of shape (n_snapshots, n_components)
        ``theta_i(t)``.
    directions : Tensor of shape (n_components, n_params)
    mean : Tensor of shape (n_params,)
        ``<w>_T`` over the same entries as the directions.
    snapshots : Tensor of shape (n_snapshots, n_params)
    """
    theta = projections.detach().to(torch.float64)
    std = theta.std(dim=0, unbiased=False)
    displacement = (theta[-1] - theta[0]).abs()
    ratio = torch.where(std > 0, displacement / std, torch.full_like(std, math.nan))
    others = ratio[1:]
    other_median = float(others.nanmedian()) if others.numel() else math.nan

    p1 = directions[0].to(torch.float64)
    w_mean = mean.to(torch.float64)
    denominator = float(p1.norm() * w_mean.norm())
    alignment = abs(float(p1 @ w_mean)) / denominator if denominator > 0 else math.nan

    n_params = directions.shape[1]
    norms = snapshots.to(torch.float64).norm(dim=1)
    return DriftStatistics(
        theta1_displacement_ratio=float(ratio[0]),
        other_displacement_ratio_median=other_median,
        p1_mean_alignment=alignment,
        random_alignment_scale=math.sqrt(2.0 / (math.pi * n_params)),
        weight_norm_change=float(norms[-1] - norms[0]),
    )
