"""Correlation time of the principal-component coordinates ``theta_i(t)``.

The normalised autocorrelation of a coordinate sampled every ``Delta`` iterations is
``rho(t) = C(t) / C(0)`` with ``C(t) = (1 / n) sum_s x_s x_{s+t}`` for the mean-removed
series ``x`` of ``n`` samples (the biased estimator, which keeps ``rho`` positive
semi-definite). Two correlation times are computed from it, both converted to
iterations by multiplying with ``Delta``:

* the integrated autocorrelation time ``tau_int = 1/2 + sum_{t=1}^{M} rho(t)``, with
  the window ``M`` chosen by Sokal's automatic rule, the smallest ``M`` with
  ``M >= c tau_int(M)`` (A. D. Sokal, "Monte Carlo Methods in Statistical Mechanics:
  Foundations and New Algorithms", in Functional Integration, NATO ASI Series B 361,
  Springer 1997, doi:10.1007/978-1-4899-0319-8_6). With this
  convention an Ornstein-Uhlenbeck process ``rho(t) = exp(-t Delta / tau)`` gives
  ``tau_int Delta = (Delta / 2) coth(Delta / (2 tau))``, which is ``tau`` to within
  ``Delta^2 / (12 tau)``;
* the e-folding time, the first lag at which ``rho`` falls below ``1/e``, linearly
  interpolated between the two lags around the crossing.

A window-limited trajectory cannot resolve correlation times close to its own length.
When the automatic window of a direction does not close before ``max_lag``, its
integrated time is summed up to ``max_lag`` and flagged as not converged. That time
is then a lower bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class CorrelationTimes:
    """Correlation times of each column of a time series, in iterations.

    Attributes
    ----------
    integrated : ndarray of shape (n_series,)
        Integrated autocorrelation time ``tau_int`` with Sokal's automatic window,
        times the sample spacing.
    window : ndarray of shape (n_series,), int
        Window ``M`` of the sum, in samples.
    converged : ndarray of shape (n_series,), bool
        False where ``M >= c tau_int(M)`` was never met up to ``max_lag``, so that
        ``integrated`` is a lower bound.
    e_folding : ndarray of shape (n_series,)
        First lag where ``rho < 1/e``, interpolated, times the sample spacing; NaN when
        ``rho`` stays above ``1/e`` up to ``max_lag``.
    max_lag : int
        Largest lag examined, in samples.
    window_factor : float
        The factor ``c`` of the automatic window.
    sample_spacing : float
        Iterations between consecutive samples.
    """

    integrated: np.ndarray
    window: np.ndarray
    converged: np.ndarray
    e_folding: np.ndarray
    max_lag: int
    window_factor: float
    sample_spacing: float


def autocorrelation(series: Tensor | np.ndarray, max_lag: int | None = None) -> np.ndarray:
    """Compute the normalised autocorrelation ``rho(t)`` of each column by FFT.

    Parameters
    ----------
    series : Tensor or ndarray of shape (n_samples, n_series)
        Equally spaced samples; a 1-D input is treated as one series.
    max_lag : int, optional
        Largest lag returned, in samples; defaults to ``n_samples - 1``.

    Returns
    -------
    ndarray of shape (max_lag + 1, n_series)
        ``rho(0) = 1``. A constant column has no defined autocorrelation and gets NaN.
    """
    x = _as_2d_float64(series)
    n_samples = x.shape[0]
    if n_samples < 2:
        raise ValueError(f"the autocorrelation needs at least 2 samples, got {n_samples}")
    if max_lag is None:
        max_lag = n_samples - 1
    if not 0 <= max_lag < n_samples:
        raise ValueError(f"max_lag={max_lag} must be between 0 and n_samples - 1 = {n_samples - 1}")

    x = x - x.mean(axis=0)
    # Zero padding to at least 2n turns the FFT's circular correlation into the linear one.
    n_fft = 1 << (2 * n_samples - 1).bit_length()
    spectrum = np.fft.rfft(x, n=n_fft, axis=0)
    covariance = np.fft.irfft(spectrum * np.conj(spectrum), n=n_fft, axis=0)[: max_lag + 1]
    covariance /= n_samples
    variance = covariance[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(variance > 0, covariance / np.where(variance > 0, variance, 1.0), np.nan)
    return rho


def correlation_times(
    series: Tensor | np.ndarray,
    sample_spacing: float = 1.0,
    window_factor: float = 5.0,
    max_lag: int | None = None,
) -> CorrelationTimes:
    """Estimate the integrated and e-folding correlation times of each column.

    Parameters
    ----------
    series : Tensor or ndarray of shape (n_samples, n_series)
        For the landscape analysis, the projections ``theta_i(t)`` of the snapshots
        (``TrajectoryPCA.projections``).
    sample_spacing : float
        Iterations between samples (the snapshot interval); the times are returned in
        iterations.
    window_factor : float
        ``c`` of Sokal's window ``M >= c tau_int(M)``. Larger values lower the bias
        from truncating ``rho`` and raise the variance.
    max_lag : int, optional
        Largest lag used, in samples. Defaults to ``n_samples // 2``, because beyond it
        fewer than half the samples enter each term of ``rho``.

    Returns
    -------
    CorrelationTimes
    """
    x = _as_2d_float64(series)
    n_samples, n_series = x.shape
    if not sample_spacing > 0 or not math.isfinite(sample_spacing):
        raise ValueError(f"sample_spacing={sample_spacing} must be a positive number of iterations")
    if not window_factor > 0:
        raise ValueError(f"window_factor={window_factor} must be positive")
    if max_lag is None:
        max_lag = max(n_samples // 2, 1)
    rho = autocorrelation(x, max_lag)

    # tau_int(M) for every M at once; the automatic window is the first M >= c tau_int(M).
    lags = np.arange(max_lag + 1)[:, None]
    running = 0.5 + np.cumsum(np.vstack([np.zeros((1, n_series)), rho[1:]]), axis=0)
    closed = lags >= window_factor * running
    closed[0] = False
    converged = np.asarray(closed.any(axis=0), dtype=bool)
    window = np.where(converged, closed.argmax(axis=0), max_lag)
    integrated = running[window, np.arange(n_series)] * sample_spacing

    e_folding = np.full(n_series, np.nan)
    threshold = math.exp(-1.0)
    for column in range(n_series):
        below = np.nonzero(rho[:, column] < threshold)[0]
        if below.size == 0:
            continue
        lag = int(below[0])
        before, after = rho[lag - 1, column], rho[lag, column]
        fraction = (before - threshold) / (before - after)
        e_folding[column] = (lag - 1 + fraction) * sample_spacing

    constant = np.isnan(rho[0])
    integrated[constant] = np.nan
    converged[constant] = False
    return CorrelationTimes(
        integrated=integrated,
        window=window.astype(np.int64),
        converged=converged,
        e_folding=e_folding,
        max_lag=int(max_lag),
        window_factor=float(window_factor),
        sample_spacing=float(sample_spacing),
    )


def _as_2d_float64(series: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(series, Tensor):
        series = series.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(series, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"series must have shape (n_samples, n_series), got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("series contains NaN or infinite values")
    return x
