"""Figures of the landscape analysis, drawn with matplotlib's Agg backend.

Each function draws one figure from arrays and writes it as a PNG; none of them reads
global state, so they can be called on saved results as well.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from vsfcl.landscape.fit import VarianceFlatnessFit  # noqa: E402
from vsfcl.landscape.spectrum import PowerLawFit  # noqa: E402


def _label_log_axis(axis: matplotlib.axis.Axis) -> None:
    """Label a log axis at 1, 2 and 5 times powers of ten, which stays readable on short ranges."""
    axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _save(figure: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_variance_spectrum(variances: np.ndarray, fit: PowerLawFit | None, path: Path) -> Path:
    """Draw the rank-ordered variances ``sigma_i^2`` on log axes with the power-law fit."""
    variances = np.asarray(variances, dtype=float)
    index = np.arange(1, variances.shape[0] + 1)
    # The centred trajectory has rank n_snapshots - 1, so the last variance is zero up
    # to rounding. Values below 1e-12 of the largest are rounding and are not drawn.
    positive = variances > 1e-12 * variances.max()
    figure, axes = plt.subplots(figsize=(5.5, 4.2))
    axes.loglog(index[positive], variances[positive], ".", markersize=3, label=r"$\sigma_i^2$")
    if fit is not None:
        fitted = np.arange(fit.min_index, fit.max_index + 1)
        axes.loglog(
            fitted,
            fit.amplitude * fitted ** (-fit.gamma),
            "-",
            color="C3",
            label=rf"fit $i^{{-\gamma}}$, $\gamma$ = {fit.gamma:.2f} (i = {fit.min_index}..{fit.max_index})",
        )
    axes.set_xlabel("rank i")
    axes.set_ylabel(r"variance $\sigma_i^2$ (weight units$^2$)")
    axes.set_title("PCA variance spectrum of the trajectory")
    axes.legend(fontsize=8)
    return _save(figure, path)


def plot_cumulative_variance(
    cumulative: np.ndarray, n_at_fraction: int | None, fraction: float, n_params: int, path: Path
) -> Path:
    """Draw ``C(n)``, the cumulative variance of components 2..n over all but the first.

    ``cumulative[k]`` is ``C(k + 2)``.
    """
    cumulative = np.asarray(cumulative, dtype=float)
    n = np.arange(2, cumulative.shape[0] + 2)
    figure, axes = plt.subplots(figsize=(5.5, 4.2))
    axes.semilogx(n, cumulative, "-", label="C(n)")
    axes.axhline(fraction, color="gray", linestyle=":", linewidth=1)
    if n_at_fraction is not None:
        axes.axvline(
            n_at_fraction,
            color="C3",
            linestyle="--",
            linewidth=1,
            label=f"C(n) = {fraction:.0%} at n = {n_at_fraction} (N = {n_params})",
        )
    axes.set_xlabel("n")
    axes.set_ylabel(r"$\sum_{i=2}^{n}\sigma_i^2 \,/\, \sum_{i\geq 2}\sigma_i^2$")
    axes.set_ylim(0, 1.02)
    axes.set_title("Cumulative variance excluding the first component")
    axes.legend(fontsize=8, loc="lower right")
    return _save(figure, path)


def plot_trajectory_planes(
    projections: np.ndarray, iterations: np.ndarray, pairs: Sequence[tuple[int, int]], path: Path
) -> Path:
    """Draw the trajectory in the planes ``(theta_i, theta_j)`` for 1-based pairs, coloured by time.

    Pairs beyond the available components are skipped.
    """
    projections = np.asarray(projections, dtype=float)
    n_components = projections.shape[1]
    pairs = [(i, j) for i, j in pairs if max(i, j) <= n_components]
    figure, axes_row = plt.subplots(1, max(len(pairs), 1), figsize=(4.4 * max(len(pairs), 1), 4.0))
    axes_list = np.atleast_1d(axes_row)
    for axes, (i, j) in zip(axes_list, pairs, strict=False):
        points = axes.scatter(
            projections[:, i - 1], projections[:, j - 1], c=iterations, s=3, cmap="viridis"
        )
        axes.plot(projections[:, i - 1], projections[:, j - 1], "-", color="gray", linewidth=0.3)
        axes.set_xlabel(rf"$\theta_{{{i}}}$")
        axes.set_ylabel(rf"$\theta_{{{j}}}$")
        axes.set_title(rf"$(\theta_{{{i}}}, \theta_{{{j}}})$ over the window")
        figure.colorbar(points, ax=axes, label="iteration")
    if not pairs:
        axes_list[0].set_title("no plane available: too few components")
    return _save(figure, path)


def plot_loss_profiles(
    offsets: np.ndarray,
    profiles: np.ndarray,
    direction_indices: Sequence[int],
    loss0: float,
    level: float,
    path: Path,
) -> Path:
    """Draw loss profiles ``L_i(delta theta)`` with the flatness level ``e L_0``.

    Parameters
    ----------
    offsets : array of shape (n_offsets,)
        Offsets along each direction, in weight units.
    profiles : array of shape (n_profiles, n_offsets)
        Training loss at each offset.
    direction_indices : sequence of int
        0-based direction index of each profile; labels show them 1-based.
    """
    figure, axes = plt.subplots(figsize=(5.8, 4.4))
    for index, profile in zip(direction_indices, np.asarray(profiles, dtype=float), strict=False):
        axes.semilogy(offsets, profile, "-", linewidth=1.2, label=f"i = {index + 1}")
    axes.axhline(level, color="black", linestyle="--", linewidth=1, label=r"$e\,L_0$")
    axes.axhline(loss0, color="gray", linestyle=":", linewidth=1, label=r"$L_0$")
    axes.set_xlabel(r"offset $\delta\theta$ along $p_i$ (weight units)")
    axes.set_ylabel("training loss")
    axes.set_title("Loss profiles along principal directions")
    axes.legend(fontsize=8, ncol=2)
    return _save(figure, path)


def plot_variance_flatness(
    variances: np.ndarray, flatness: np.ndarray, fit: VarianceFlatnessFit | None, path: Path
) -> Path:
    """Draw ``sigma_i^2`` against ``F_i`` on log axes with the fitted ``F^-psi`` line.

    Directions with an undefined flatness (censored) are not drawn.
    """
    variances = np.asarray(variances, dtype=float)
    flatness = np.asarray(flatness, dtype=float)
    finite = np.isfinite(flatness) & (flatness > 0) & (variances > 0)
    index = np.arange(1, variances.shape[0] + 1)
    figure, axes = plt.subplots(figsize=(5.5, 4.2))
    points = axes.scatter(
        flatness[finite],
        variances[finite],
        c=index[finite],
        s=10,
        cmap="viridis",
        norm=matplotlib.colors.LogNorm(),
    )
    figure.colorbar(points, ax=axes, label="rank i")
    axes.set_xscale("log")
    axes.set_yscale("log")
    _label_log_axis(axes.xaxis)
    if fit is not None and finite.any():
        line = np.geomspace(flatness[finite].min(), flatness[finite].max(), 50)
        low, high = fit.psi_ci
        interval = f" [{low:.2f}, {high:.2f}]" if math.isfinite(low) and math.isfinite(high) else ""
        axes.plot(
            line,
            np.exp(fit.intercept) * line ** (-fit.psi),
            "-",
            color="C3",
            label=rf"$\sigma^2 \propto F^{{-\psi}}$, $\psi$ = {fit.psi:.2f}{interval}",
        )
        axes.legend(fontsize=8)
    n_censored = int((~np.isfinite(flatness)).sum())
    axes.set_xlabel(r"flatness $F_i$ (weight units)")
    axes.set_ylabel(r"variance $\sigma_i^2$ (weight units$^2$)")
    axes.set_title(f"Variance against flatness ({n_censored} censored not shown)")
    return _save(figure, path)


def plot_curvature_flatness(
    curvature: np.ndarray, flatness: np.ndarray, loss0: float, path: Path
) -> Path:
    """Draw Hessian curvature ``p_i^T H p_i`` against ``F_i`` with the quadratic ``8 (e-1) L_0 / F^2``."""
    curvature = np.asarray(curvature, dtype=float)
    flatness = np.asarray(flatness, dtype=float)
    usable = np.isfinite(flatness) & (flatness > 0) & (curvature > 0)
    figure, axes = plt.subplots(figsize=(5.5, 4.2))
    axes.loglog(flatness[usable], curvature[usable], ".", label=r"$p_i^T H p_i$")
    if usable.any():
        line = np.geomspace(flatness[usable].min(), flatness[usable].max(), 50)
        axes.loglog(
            line,
            8 * (math.e - 1) * loss0 / line**2,
            "--",
            color="C3",
            label=r"quadratic: $8(e-1)L_0/F^2$",
        )
    _label_log_axis(axes.xaxis)
    axes.set_xlabel(r"flatness $F_i$ (weight units)")
    axes.set_ylabel("curvature (loss / weight units$^2$)")
    axes.set_title("Hessian curvature against flatness")
    axes.legend(fontsize=8)
    return _save(figure, path)
