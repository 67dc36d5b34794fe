"""Random-landscape statistics of SGD and the equilibrium (Langevin) contrast.

Feng and Tu (PNAS 118, e2015617118, 2021) explain the inverse variance-flatness
relation ``sigma_i^2 ~ F_i^-psi`` by the statistics of the minibatch losses
``L^mu = L + delta L^mu``. SGD moves with noise ``-alpha grad delta L^mu``, whose
strength along ``p_i`` is the effective temperature
``T_i = (alpha / 2) <(d delta L^mu / d theta_i)^2>_mu``. Both ``T_i`` and the
correlation time ``tau_i`` of ``theta_i(t)`` fall as ``F_i`` grows.
:func:`analyse_random_landscape` measures, per analysed direction,

* ``T_i`` from per-minibatch gradients at ``w_0`` (:mod:`vsfcl.landscape.minibatch`);
* ``tau_i`` from the trajectory projections (:mod:`vsfcl.landscape.correlation`);
* the spread of the minibatch minima and the minibatch curvature from quadratic fits
  of the minibatch loss profiles;

and fits power laws of each against ``F_i`` with bootstrap intervals. It also checks
how much of ``sigma_i^2`` the local harmonic picture accounts for: an Ornstein-Uhlenbeck
coordinate with step noise of variance ``2 alpha T_i`` and relaxation time ``tau_i``
iterations has ``sigma_i^2 = alpha T_i tau_i`` (since ``tau = 1 / (alpha k)`` and
``sigma^2 = T / k``), so ``log sigma_i^2`` is regressed on ``log(T_i tau_i)``.

:func:`run_langevin_contrast` runs full-batch gradient descent with isotropic noise of
one temperature from the same starting point and repeats the PCA, flatness and ``psi``
fit on its trajectory; at equilibrium ``sigma_i^2 ~ T F_i^2``, so its ``psi`` should be
near -2 where SGD's is positive.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from vsfcl.flatness import FlatnessResult  # noqa: E402
from vsfcl.landscape.artifacts import to_json_value  # noqa: E402
from vsfcl.landscape.correlation import CorrelationTimes, correlation_times  # noqa: E402
from vsfcl.landscape.fit import VarianceFlatnessFit, fit_variance_flatness  # noqa: E402
from vsfcl.landscape.langevin import ModelLangevin, TrainedParameters, run_langevin  # noqa: E402
from vsfcl.landscape.minibatch import (  # noqa: E402
    MinibatchMinima,
    directional_derivatives,
    draw_minibatches,
    effective_temperature,
    fit_minibatch_minima,
    minibatch_profiles,
    offset_grid,
)
from vsfcl.landscape.profiles import ProfileEvaluator  # noqa: E402
from vsfcl.landscape.trajectory import unflatten_parameters  # noqa: E402
from vsfcl.pca import trajectory_pca  # noqa: E402

log = logging.getLogger(__name__)

CorrelationEstimator = Literal["integrated", "e_folding"]
OffsetScale = Literal["flatness", "sigma"]


@dataclass(frozen=True)
class TheorySettings:
    """Settings of :func:`analyse_random_landscape`.

    Attributes
    ----------
    n_minibatches : int
        Minibatches in the ensemble, drawn like an SGD epoch.
    n_offsets : int
        Points of each minibatch profile grid, at least 3.
    offset_half_width : float
        Half-width of the grid, in units of ``F_i`` ("flatness") or ``sigma_i``
        ("sigma"). 0.25 F_i reaches halfway to the ``e L_0`` crossings of a quadratic
        profile.
    offset_scale : {"flatness", "sigma"}
        Unit of ``offset_half_width``. With "flatness", censored directions get no
        minibatch profiles.
    correlation_estimator : {"integrated", "e_folding"}
        Which correlation time enters the fits; both are reported.
    window_factor : float
        ``c`` of Sokal's automatic window ``M >= c tau_int(M)``.
    fit_min_index, fit_max_index : int, int or None
        1-based range of directions in the power-law fits; None ends at the last.
    bootstrap_samples : int
        Resamples of the percentile bootstrap of each exponent.
    ci_level : float
        Coverage of the intervals.
    seed : int
        Seeds the minibatch draw and the bootstrap.
    gradient_chunk_size : int
        Samples per vectorised gradient pass.
    max_profile_batch : int
        Points per vectorised pass of the minibatch profile evaluator.
    """

    n_minibatches: int = 100
    n_offsets: int = 9
    offset_half_width: float = 0.25
    offset_scale: OffsetScale = "flatness"
    correlation_estimator: CorrelationEstimator = "integrated"
    window_factor: float = 5.0
    fit_min_index: int = 1
    fit_max_index: int | None = None
    bootstrap_samples: int = 1000
    ci_level: float = 0.95
    seed: int = 0
    gradient_chunk_size: int = 8192
    max_profile_batch: int = 256

    def __post_init__(self) -> None:
        if self.n_minibatches < 2:
            raise ValueError(f"n_minibatches={self.n_minibatches} must be at least 2 for a spread")
        if self.n_offsets < 3:
            raise ValueError(f"n_offsets={self.n_offsets} must be at least 3 to fit a quadratic")
        if not self.offset_half_width > 0:
            raise ValueError(f"offset_half_width={self.offset_half_width} must be positive")
        if self.offset_scale not in ("flatness", "sigma"):
            raise ValueError(
                f"offset_scale={self.offset_scale!r} is invalid; use 'flatness' or 'sigma'"
            )
        if self.correlation_estimator not in ("integrated", "e_folding"):
            raise ValueError(
                f"correlation_estimator={self.correlation_estimator!r} is invalid; use "
                "'integrated' or 'e_folding'"
            )
        if self.fit_min_index < 1:
            raise ValueError(f"fit_min_index={self.fit_min_index} must be at least 1")


@dataclass(frozen=True)
class LangevinSettings:
    """Settings of :func:`run_langevin_contrast`.

    Attributes
    ----------
    temperature : float or None
        ``T`` in loss units; None lets the caller choose, for example the median SGD
        ``T_i`` (:meth:`RandomLandscapeAnalysis.median_temperature`).
    n_samples : int or None
        Training samples in the full-batch loss, drawn at random with ``seed``; None
        uses every sample given.
    n_steps, burn_in : int
        Recorded steps and steps before recording.
    snapshot_interval : int
        Steps between snapshots.
    trained : {"analysed", "all"}
        Parameters that the dynamics update (see :func:`vsfcl.landscape.langevin.run_langevin`).
    n_directions : int
        Leading principal directions of the Langevin trajectory whose flatness is measured.
    initial_step_scale, max_offset, flatness_rtol
        As in the SGD analysis: first bracketing step in units of ``sigma_i``, search
        range in weight units, and refinement tolerance of the flatness search.
    fit_min_index, fit_max_index : int, int or None
        1-based range of directions in the ``psi`` fit.
    bootstrap_samples : int
    ci_level : float
    chunk_size : int
        Samples per chunk of the loss and profile evaluation.
    seed : int
        Seeds the subset and the noise.
    """

    temperature: float | None = None
    n_samples: int | None = 5000
    n_steps: int = 4000
    burn_in: int = 1000
    snapshot_interval: int = 5
    trained: TrainedParameters = "analysed"
    n_directions: int = 50
    initial_step_scale: float = 1.0
    max_offset: float = 20.0
    flatness_rtol: float = 1e-3
    fit_min_index: int = 1
    fit_max_index: int | None = None
    bootstrap_samples: int = 1000
    ci_level: float = 0.95
    chunk_size: int = 8192
    seed: int = 0


def settings_from_mapping(
    mapping: dict[str, Any],
) -> tuple[TheorySettings, LangevinSettings | None]:
    """Build the settings from the plain ``theory`` mapping of ``conf/landscape/theory/``.

    Returns
    -------
    tuple
        ``TheorySettings`` from ``mapping["minibatch"]``, and ``LangevinSettings`` from
        ``mapping["langevin"]``, or None when its ``enabled`` key is false.
    """
    theory = TheorySettings(**mapping.get("minibatch", {}))
    langevin = dict(mapping.get("langevin", {}))
    if not langevin.pop("enabled", True):
        return theory, None
    return theory, LangevinSettings(**langevin)


@dataclass(frozen=True)
class PowerLawExponent:
    """Least-squares fit of ``log y = intercept + exponent log x`` over directions.

    Attributes
    ----------
    exponent : float
        Slope of the log-log fit.
    exponent_ci : tuple of float
        Percentile bootstrap interval of the slope; NaN when it is undefined.
    ci_level : float
    pearson_r : float
        Correlation of ``log x`` and ``log y``.
    intercept : float
    used_indices : list of int
        0-based directions in the fit.
    n_excluded : int
        Directions in the range left out because ``x`` or ``y`` is missing or not positive.
    """

    exponent: float
    exponent_ci: tuple[float, float]
    ci_level: float
    pearson_r: float
    intercept: float
    used_indices: list[int]
    n_excluded: int

    @classmethod
    def from_variance_flatness_fit(cls, fit: VarianceFlatnessFit) -> PowerLawExponent:
        """Convert a fit of ``y ~ x^-psi`` into the slope convention ``y ~ x^exponent``."""
        low, high = fit.psi_ci
        return cls(
            exponent=-fit.psi,
            exponent_ci=(-high, -low),
            ci_level=fit.ci_level,
            pearson_r=fit.pearson_r,
            intercept=fit.intercept,
            used_indices=fit.used_indices,
            n_excluded=fit.n_censored,
        )


@dataclass
class RandomLandscapeAnalysis:
    """Per-direction random-landscape statistics and their power laws in ``F_i``.

    Every per-direction array has shape (n_directions,), in the order of the
    directions given. NaN marks an undefined value; :meth:`to_summary` turns it into
    null with a reason.

    Attributes
    ----------
    flatness, variances : ndarray
        ``F_i`` (weight units, NaN when censored) and ``sigma_i^2`` (squared weight
        units), as given.
    temperature : ndarray
        ``T_i`` in loss units.
    full_batch_derivative : ndarray
        ``g . p_i`` at ``w_0``, in loss units per weight unit.
    correlation : CorrelationTimes
        Both correlation-time estimates, in iterations.
    correlation_time : ndarray
        The estimate chosen by ``settings.correlation_estimator``, in iterations.
    minima : MinibatchMinima
        Per-minibatch quadratic fits.
    minimum_offset_mean, minimum_offset_std : ndarray
        Mean and spread (``ddof=0``) over minibatches of the fitted minimum offsets, weight units.
    curvature_mean, curvature_std : ndarray
        Mean and spread of the fitted minibatch curvatures, loss per squared weight unit.
    harmonic_ratio : ndarray
        ``sigma_i^2 / (alpha T_i tau_i)``, 1 for a harmonic coordinate at equilibrium
        with SGD's noise.
    fits : dict of str to PowerLawExponent or None
        ``"temperature"``, ``"correlation_time"``, ``"temperature_times_time"``,
        ``"minimum_offset_std"`` and ``"curvature_mean"`` against ``F_i``;
        ``"variance_vs_temperature_times_time"``, ``"variance_vs_temperature"`` and
        ``"variance_vs_correlation_time"`` with ``sigma_i^2`` as ``y``.
    fit_errors : dict of str to str
        Why a fit in ``fits`` is None.
    """

    flatness: np.ndarray
    variances: np.ndarray
    temperature: np.ndarray
    full_batch_derivative: np.ndarray
    correlation: CorrelationTimes
    correlation_time: np.ndarray
    minima: MinibatchMinima
    minimum_offset_mean: np.ndarray
    minimum_offset_std: np.ndarray
    curvature_mean: np.ndarray
    curvature_std: np.ndarray
    harmonic_ratio: np.ndarray
    fits: dict[str, PowerLawExponent | None]
    fit_errors: dict[str, str]
    batch_size: int
    learning_rate: float
    snapshot_interval: int
    settings: TheorySettings
    timing: dict[str, float] = field(default_factory=dict)

    def median_temperature(self) -> float:
        """Return the median ``T_i`` over the directions, a default temperature for Langevin."""
        return float(np.nanmedian(self.temperature))

    def to_summary(self) -> dict[str, Any]:
        """Return a JSON-ready dict in which ``null_reasons`` explains each null."""
        reasons: dict[str, str] = {}
        censored = "censored flatness (offset_scale='flatness' gives such a direction no grid)"
        no_minimum = f"{censored}, or no minibatch fit had a minimum (quadratic coefficient <= 0)"
        ratio_reason = "T_i or tau_i undefined or zero"
        correlation_reason = (
            "constant projection, or rho stayed above 1/e up to max_lag (e_folding)"
        )
        summary: dict[str, Any] = {
            "flatness": to_json_value(self.flatness, "flatness", reasons, "censored flatness"),
            "variance": to_json_value(self.variances, "variance", reasons, "undefined variance"),
            "temperature": to_json_value(
                self.temperature, "temperature", reasons, "undefined gradient"
            ),
            "full_batch_derivative": to_json_value(
                self.full_batch_derivative, "full_batch_derivative", reasons, "undefined gradient"
            ),
            "correlation_time": to_json_value(
                self.correlation_time, "correlation_time", reasons, correlation_reason
            ),
            "correlation_time_integrated": to_json_value(
                self.correlation.integrated,
                "correlation_time_integrated",
                reasons,
                correlation_reason,
            ),
            "correlation_time_e_folding": to_json_value(
                self.correlation.e_folding,
                "correlation_time_e_folding",
                reasons,
                correlation_reason,
            ),
            "correlation_window": self.correlation.window.tolist(),
            "correlation_converged": self.correlation.converged.tolist(),
            "minimum_offset_mean": to_json_value(
                self.minimum_offset_mean, "minimum_offset_mean", reasons, no_minimum
            ),
            "minimum_offset_std": to_json_value(
                self.minimum_offset_std, "minimum_offset_std", reasons, no_minimum
            ),
            "curvature_mean": to_json_value(
                self.curvature_mean, "curvature_mean", reasons, censored
            ),
            "curvature_std": to_json_value(self.curvature_std, "curvature_std", reasons, censored),
            "n_minima": self.minima.n_minima.tolist(),
            "n_minima_outside_grid": self.minima.n_outside_grid.tolist(),
            "grid_half_width": to_json_value(
                self.minima.half_width, "grid_half_width", reasons, censored
            ),
            "harmonic_ratio": to_json_value(
                self.harmonic_ratio, "harmonic_ratio", reasons, ratio_reason
            ),
            "harmonic_ratio_median": to_json_value(
                _nan_median(self.harmonic_ratio), "harmonic_ratio_median", reasons, ratio_reason
            ),
            "fits": {},
            "estimators": {
                "temperature": "T_i = (alpha/2) mean over minibatches of (g_mu.p_i - g.p_i)^2, "
                "g the full-batch gradient over the training samples given",
                "correlation_time": (
                    "integrated autocorrelation time 1/2 + sum_{t=1}^{M} rho(t), Sokal's window "
                    f"M >= {self.correlation.window_factor:g} tau_int(M), max lag "
                    f"{self.correlation.max_lag} snapshots"
                    if self.settings.correlation_estimator == "integrated"
                    else "first lag with rho < 1/e, interpolated, max lag "
                    f"{self.correlation.max_lag} snapshots"
                ),
                "correlation_time_unit": f"iterations ({self.snapshot_interval} per snapshot)",
                "minibatch_minima": (
                    f"least-squares quadratic on {self.settings.n_offsets} offsets in "
                    f"+-{self.settings.offset_half_width:g} x "
                    f"{'F_i' if self.settings.offset_scale == 'flatness' else 'sigma_i'}; "
                    "spreads are standard deviations over minibatches (ddof=0)"
                ),
            },
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "snapshot_interval": self.snapshot_interval,
            "settings": asdict(self.settings),
            "timing": dict(self.timing),
        }
        for name, fit in self.fits.items():
            summary["fits"][name] = to_json_value(
                asdict(fit) if fit is not None else None,
                f"fits.{name}",
                reasons,
                self.fit_errors.get(
                    name, "bootstrap interval undefined (too few resamples with spread)"
                ),
            )
        summary["null_reasons"] = reasons
        return summary


def analyse_random_landscape(
    model: nn.Module,
    parameter_names: Sequence[str],
    train_inputs: Tensor,
    train_targets: Tensor,
    batch_size: int,
    learning_rate: float,
    center: Tensor,
    directions: Tensor,
    flatness: Tensor,
    variances: Tensor,
    projections: Tensor,
    snapshot_interval: int,
    settings: TheorySettings = TheorySettings(),
) -> RandomLandscapeAnalysis:
    """Measure ``T_i``, ``tau_i`` and the minibatch minima per direction and fit them to ``F_i``.

    Parameters
    ----------
    model : nn.Module
        The trained network. Parameters outside ``parameter_names`` keep their values
        in it (the pipeline sets every parameter to its time average).
    parameter_names : sequence of str
        Analysed parameters, in the order of the flattened vectors.
    train_inputs : Tensor of shape (n_samples, ...)
    train_targets : Tensor of shape (n_samples,), int64
        The training set SGD used, on the device of the evaluation. Minibatches are
        drawn from it and the full-batch gradient averages over all of it.
    batch_size : int
        Minibatch size ``B`` of training.
    learning_rate : float
        ``alpha`` of training, per step.
    center : Tensor of shape (n_params,)
        ``w_0``, the time-averaged analysed weights.
    directions : Tensor of shape (n_directions, n_params)
        Unit principal directions ``p_i``, rank-ordered.
    flatness : Tensor of shape (n_directions,)
        ``F_i`` in weight units; NaN for a censored direction.
    variances : Tensor of shape (n_directions,)
        ``sigma_i^2`` in squared weight units.
    projections : Tensor of shape (n_snapshots, n_components)
        ``theta_i(t)`` of the snapshots with ``n_components >= n_directions``; the first
        ``n_directions`` columns are used.
    snapshot_interval : int
        Iterations between snapshots.
    settings : TheorySettings

    Returns
    -------
    RandomLandscapeAnalysis
    """
    n_directions = _validate_inputs(
        parameter_names,
        train_inputs,
        train_targets,
        batch_size,
        learning_rate,
        center,
        directions,
        flatness,
        variances,
        projections,
        snapshot_interval,
    )
    timing: dict[str, float] = {}
    flatness_values = flatness.detach().to("cpu", torch.float64).numpy()
    variance_values = variances.detach().to("cpu", torch.float64).numpy()
    generator = torch.Generator().manual_seed(settings.seed)
    minibatch_indices = draw_minibatches(
        train_inputs.shape[0], batch_size, settings.n_minibatches, generator
    )

    # Effective temperature from per-minibatch directional derivatives.
    clock = time.perf_counter()
    derivatives = directional_derivatives(
        model,
        parameter_names,
        center,
        directions,
        train_inputs,
        train_targets,
        minibatch_indices,
        chunk_size=settings.gradient_chunk_size,
    )
    temperature = effective_temperature(
        derivatives.minibatch, derivatives.full_batch, learning_rate
    )
    timing["temperature_seconds"] = time.perf_counter() - clock

    # Correlation times of the projections, in iterations.
    clock = time.perf_counter()
    correlation = correlation_times(
        projections[:, :n_directions],
        sample_spacing=float(snapshot_interval),
        window_factor=settings.window_factor,
    )
    chosen_time = (
        correlation.integrated
        if settings.correlation_estimator == "integrated"
        else correlation.e_folding
    )
    timing["correlation_seconds"] = time.perf_counter() - clock

    # Minibatch loss profiles on a grid scaled by F_i or sigma_i, fitted by quadratics.
    clock = time.perf_counter()
    scale = flatness_values if settings.offset_scale == "flatness" else np.sqrt(variance_values)
    offsets = offset_grid(settings.offset_half_width * scale, settings.n_offsets)
    losses = minibatch_profiles(
        model,
        parameter_names,
        center,
        directions,
        train_inputs,
        train_targets,
        minibatch_indices,
        offsets,
        max_batch=settings.max_profile_batch,
    )
    minima = fit_minibatch_minima(offsets, losses)
    statistics = minima.statistics()
    timing["minibatch_profile_seconds"] = time.perf_counter() - clock

    # Power laws against F_i and the check of sigma_i^2 against alpha T_i tau_i.
    with np.errstate(invalid="ignore", divide="ignore"):
        harmonic_ratio = variance_values / (learning_rate * temperature * chosen_time)
    harmonic_ratio[~np.isfinite(harmonic_ratio)] = np.nan
    fits, fit_errors = _fit_exponents(
        flatness_values, variance_values, temperature, chosen_time, statistics, settings
    )
    log.info(
        "Random landscape: %d directions, %d minibatches of %d; exponents vs F: T %s, tau %s; "
        "sigma^2 vs T*tau slope %s; median sigma^2/(alpha T tau) %.3g",
        n_directions,
        settings.n_minibatches,
        batch_size,
        _format_exponent(fits.get("temperature")),
        _format_exponent(fits.get("correlation_time")),
        _format_exponent(fits.get("variance_vs_temperature_times_time")),
        _nan_median(harmonic_ratio),
    )
    return RandomLandscapeAnalysis(
        flatness=flatness_values,
        variances=variance_values,
        temperature=temperature,
        full_batch_derivative=derivatives.full_batch.numpy(),
        correlation=correlation,
        correlation_time=chosen_time,
        minima=minima,
        minimum_offset_mean=statistics["minimum_offset_mean"],
        minimum_offset_std=statistics["minimum_offset_std"],
        curvature_mean=statistics["curvature_mean"],
        curvature_std=statistics["curvature_std"],
        harmonic_ratio=harmonic_ratio,
        fits=fits,
        fit_errors=fit_errors,
        batch_size=int(batch_size),
        learning_rate=float(learning_rate),
        snapshot_interval=int(snapshot_interval),
        settings=settings,
        timing=timing,
    )


def _validate_inputs(
    parameter_names: Sequence[str],
    train_inputs: Tensor,
    train_targets: Tensor,
    batch_size: int,
    learning_rate: float,
    center: Tensor,
    directions: Tensor,
    flatness: Tensor,
    variances: Tensor,
    projections: Tensor,
    snapshot_interval: int,
) -> int:
    """Check shapes and ranges once and return the number of directions."""
    if not list(parameter_names):
        raise ValueError("parameter_names is empty; name the analysed parameters")

    n_samples = train_inputs.shape[0]
    if train_targets.shape != (n_samples,):
        raise ValueError(
            f"train_targets must have shape ({n_samples},) to match train_inputs, got "
            f"{tuple(train_targets.shape)}"
        )
    if not 1 <= batch_size <= n_samples:
        raise ValueError(
            f"batch_size={batch_size} must be between 1 and the {n_samples} training samples"
        )
    if not learning_rate > 0 or not math.isfinite(learning_rate):
        raise ValueError(f"learning_rate={learning_rate} must be a positive number")
    if snapshot_interval < 1:
        raise ValueError(f"snapshot_interval={snapshot_interval} must be at least 1 iteration")

    if center.ndim != 1:
        raise ValueError(f"center must have shape (n_params,), got {tuple(center.shape)}")
    if directions.ndim != 2 or directions.shape[1] != center.shape[0]:
        raise ValueError(
            f"directions must have shape (n_directions, {center.shape[0]}), "
            f"got {tuple(directions.shape)}"
        )
    n_directions = directions.shape[0]
    if flatness.shape != (n_directions,) or variances.shape != (n_directions,):
        raise ValueError(
            f"flatness {tuple(flatness.shape)} and variances {tuple(variances.shape)} "
            "must both have "
            f"shape ({n_directions},), one entry per direction"
        )
    if projections.ndim != 2 or projections.shape[1] < n_directions or projections.shape[0] < 2:
        raise ValueError(
            f"projections must have shape (n_snapshots >= 2, n_components >= {n_directions}), "
            f"got {tuple(projections.shape)}"
        )
    return n_directions


def _fit_exponents(
    flatness: np.ndarray,
    variances: np.ndarray,
    temperature: np.ndarray,
    correlation_time: np.ndarray,
    statistics: dict[str, np.ndarray],
    settings: TheorySettings,
) -> tuple[dict[str, PowerLawExponent | None], dict[str, str]]:
    """Fit every power law of the analysis; a fit that cannot run is None with its error."""
    with np.errstate(invalid="ignore"):
        temperature_times_time = temperature * correlation_time
    pairs = {
        "temperature": (temperature, flatness),
        "correlation_time": (correlation_time, flatness),
        "temperature_times_time": (temperature_times_time, flatness),
        "minimum_offset_std": (statistics["minimum_offset_std"], flatness),
        "curvature_mean": (statistics["curvature_mean"], flatness),
        "variance_vs_temperature_times_time": (variances, temperature_times_time),
        "variance_vs_temperature": (variances, temperature),
        "variance_vs_correlation_time": (variances, correlation_time),
    }
    n_directions = flatness.shape[0]
    max_index = min(settings.fit_max_index or n_directions, n_directions)
    min_index = min(settings.fit_min_index, max_index)
    fits: dict[str, PowerLawExponent | None] = {}
    errors: dict[str, str] = {}
    for name, (y, x) in pairs.items():
        try:
            # fit_variance_flatness fits log y = c - psi log x with a bootstrap over directions.
            fit = fit_variance_flatness(
                torch.as_tensor(y),
                torch.as_tensor(x),
                min_index,
                max_index,
                settings.bootstrap_samples,
                settings.ci_level,
                settings.seed,
            )
            fits[name] = PowerLawExponent.from_variance_flatness_fit(fit)
        except ValueError as error:
            fits[name] = None
            errors[name] = str(error)
            log.warning("Power-law fit %s failed: %s", name, error)
    return fits, errors


@dataclass
class LangevinContrast:
    """Langevin trajectory analysed like SGD's: PCA, flatness and ``psi``.

    Attributes
    ----------
    langevin : ModelLangevin
    variances : ndarray of shape (n_directions,)
        ``sigma_i^2`` of the leading principal directions of the Langevin trajectory.
    flatness : FlatnessResult
        Flatness along those directions at the Langevin time average, on the same
        training samples the dynamics used.
    psi_fit : VarianceFlatnessFit or None
    psi_fit_error : str or None
    settings : LangevinSettings
    timing : dict of str to float
    """

    langevin: ModelLangevin
    variances: np.ndarray
    flatness: FlatnessResult
    psi_fit: VarianceFlatnessFit | None
    psi_fit_error: str | None
    settings: LangevinSettings
    timing: dict[str, float] = field(default_factory=dict)

    def to_summary(self) -> dict[str, Any]:
        """Return a JSON-ready dict in which ``null_reasons`` explains each null."""
        reasons: dict[str, str] = {}
        trajectory = self.langevin.trajectory
        fit = self.psi_fit
        summary = {
            "temperature": trajectory.temperature,
            "learning_rate": trajectory.learning_rate,
            "trained": self.settings.trained,
            "n_samples": self.langevin.n_samples,
            "n_snapshots": int(trajectory.snapshots.shape[0]),
            "loss_first_snapshot": float(trajectory.losses[0]),
            "loss_last_snapshot": float(trajectory.losses[-1]),
            "loss0": self.flatness.loss0,
            "variance": to_json_value(self.variances, "variance", reasons, "undefined variance"),
            "flatness": to_json_value(
                self.flatness.flatness,
                "flatness",
                reasons,
                "censored: the profile did not reach e*L0 within max_offset on one side",
            ),
            "n_censored": int(self.flatness.censored.sum()),
            "psi": to_json_value(
                fit.psi if fit else None, "psi", reasons, f"fit failed: {self.psi_fit_error}"
            ),
            "psi_ci": to_json_value(
                list(fit.psi_ci) if fit else None,
                "psi_ci",
                reasons,
                f"fit failed ({self.psi_fit_error}) or too few bootstrap resamples with spread",
            ),
            "pearson_r": to_json_value(
                fit.pearson_r if fit else None,
                "pearson_r",
                reasons,
                f"fit failed: {self.psi_fit_error}",
            ),
            "settings": to_json_value(asdict(self.settings), "settings", reasons, "unset"),
            "timing": dict(self.timing),
        }
        summary["null_reasons"] = reasons
        return summary


def run_langevin_contrast(
    model: nn.Module,
    parameter_names: Sequence[str],
    train_inputs: Tensor,
    train_targets: Tensor,
    learning_rate: float,
    temperature: float,
    settings: LangevinSettings = LangevinSettings(),
) -> LangevinContrast:
    """Run Langevin dynamics from the model's current weights and fit its ``sigma^2 ~ F^-psi``.

    Parameters
    ----------
    model : nn.Module
        Network at the starting point (for SGD's ``w_0``, every parameter at its time
        average). It is not modified.
    parameter_names : sequence of str
        Analysed parameters, recorded and analysed as in the SGD run.
    train_inputs : Tensor of shape (n_samples, ...)
    train_targets : Tensor of shape (n_samples,), int64
        Training set; ``settings.n_samples`` of them are drawn for the full-batch loss.
    learning_rate : float
        ``alpha`` per step, usually SGD's.
    temperature : float
        ``T`` in loss units (``settings.temperature`` is ignored here; the caller
        resolves it).
    settings : LangevinSettings

    Returns
    -------
    LangevinContrast
    """
    timing: dict[str, float] = {}
    n_total = train_inputs.shape[0]
    n_samples = n_total if settings.n_samples is None else settings.n_samples
    if not 1 <= n_samples <= n_total:
        raise ValueError(
            f"n_samples={settings.n_samples} must be between 1 and the {n_total} training samples, "
            "or None for all"
        )
    generator = torch.Generator().manual_seed(settings.seed)
    keep = torch.randperm(n_total, generator=generator)[:n_samples].to(train_inputs.device)
    inputs, targets = train_inputs[keep], train_targets[keep]

    # Dynamics from the model's current weights.
    langevin = run_langevin(
        model,
        parameter_names,
        inputs,
        targets,
        learning_rate,
        temperature,
        settings.n_steps,
        settings.snapshot_interval,
        burn_in=settings.burn_in,
        trained=settings.trained,
        chunk_size=settings.chunk_size,
        seed=settings.seed,
    )
    timing["dynamics_seconds"] = langevin.trajectory.seconds

    # PCA of the recorded snapshots, as for SGD.
    clock = time.perf_counter()
    snapshots = langevin.trajectory.snapshots
    n_directions = min(settings.n_directions, *snapshots.shape)
    pca = trajectory_pca(snapshots, n_components=n_directions)
    timing["pca_seconds"] = time.perf_counter() - clock

    # Flatness at the Langevin time average, on the samples the dynamics used.
    clock = time.perf_counter()
    averaged = copy.deepcopy(model)
    with torch.no_grad():
        values = unflatten_parameters(
            averaged, langevin.trained_names, langevin.trajectory.time_average.to(inputs.device)
        )
        for name, value in values.items():
            averaged.get_parameter(name).copy_(value)
    evaluator = ProfileEvaluator(
        averaged,
        langevin.analysed_names,
        pca.mean.to(inputs.device),
        pca.directions.to(inputs.device),
        inputs,
        targets,
        chunk_size=min(settings.chunk_size, n_samples),
    )
    flatness = evaluator.flatness(
        pca.variances, settings.initial_step_scale, settings.max_offset, settings.flatness_rtol
    )
    timing["flatness_seconds"] = time.perf_counter() - clock

    # psi of the Langevin trajectory.
    psi_fit, psi_error = None, None
    max_index = min(settings.fit_max_index or n_directions, n_directions)
    try:
        psi_fit = fit_variance_flatness(
            pca.variances,
            flatness.flatness,
            min(settings.fit_min_index, max_index),
            max_index,
            settings.bootstrap_samples,
            settings.ci_level,
            settings.seed,
        )
    except ValueError as error:
        psi_error = str(error)
        log.warning("Variance-flatness fit of the Langevin trajectory failed: %s", error)
    log.info(
        "Langevin contrast at T=%.3g: psi=%s, %d of %d directions censored",
        temperature,
        f"{psi_fit.psi:.3f}" if psi_fit else "undefined",
        int(flatness.censored.sum()),
        n_directions,
    )
    return LangevinContrast(
        langevin=langevin,
        variances=pca.variances.double().cpu().numpy(),
        flatness=flatness,
        psi_fit=psi_fit,
        psi_fit_error=psi_error,
        settings=settings,
        timing=timing,
    )


# Figures (matplotlib's Agg backend); each writes one PNG and returns its path.


def plot_temperature_and_correlation_time(
    analysis: RandomLandscapeAnalysis, path: str | Path
) -> Path:
    """Draw ``T_i`` and ``tau_i`` against ``F_i`` on log axes, each with its fitted power law."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.2))
    _scatter_with_fit(
        left,
        analysis.flatness,
        analysis.temperature,
        analysis.fits.get("temperature"),
        "T",
    )
    left.set_ylabel(r"effective temperature $T_i$ (loss units)")
    left.set_title(r"$T_i = (\alpha/2)\langle(\partial_i \delta L^\mu)^2\rangle_\mu$")
    _scatter_with_fit(
        right,
        analysis.flatness,
        analysis.correlation_time,
        analysis.fits.get("correlation_time"),
        r"\tau",
    )
    right.set_ylabel(r"correlation time $\tau_i$ (iterations)")
    right.set_title(f"{analysis.settings.correlation_estimator} correlation time")
    return _save_figure(figure, path)


def plot_minibatch_minima(analysis: RandomLandscapeAnalysis, path: str | Path) -> Path:
    """Draw the spread of the minibatch minima and the mean minibatch curvature against ``F_i``."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.2))
    _scatter_with_fit(
        left,
        analysis.flatness,
        analysis.minimum_offset_std,
        analysis.fits.get("minimum_offset_std"),
        r"\mathrm{std}_\mu",
    )
    left.set_ylabel("std over minibatches of the minimum offset (weight units)")
    left.set_title("Spread of the minibatch minima")
    _scatter_with_fit(
        right,
        analysis.flatness,
        analysis.curvature_mean,
        analysis.fits.get("curvature_mean"),
        "k",
    )
    right.set_ylabel("mean minibatch curvature (loss / weight units$^2$)")
    right.set_title("Curvature of the minibatch profiles")
    return _save_figure(figure, path)


def plot_variance_prediction(analysis: RandomLandscapeAnalysis, path: str | Path) -> Path:
    """Draw ``sigma_i^2`` against ``alpha T_i tau_i`` with the line of equality."""
    prediction = analysis.learning_rate * analysis.temperature * analysis.correlation_time
    figure, axes = plt.subplots(figsize=(5.5, 4.4))

    usable = np.isfinite(prediction) & (prediction > 0) & (analysis.variances > 0)
    index = np.arange(1, prediction.shape[0] + 1)
    points = axes.scatter(
        prediction[usable],
        analysis.variances[usable],
        c=index[usable],
        s=10,
        cmap="viridis",
        norm=matplotlib.colors.LogNorm(),
    )
    figure.colorbar(points, ax=axes, label="rank i")
    if usable.any():
        line = np.geomspace(
            min(prediction[usable].min(), analysis.variances[usable].min()),
            max(prediction[usable].max(), analysis.variances[usable].max()),
            20,
        )
        axes.plot(line, line, "--", color="gray", linewidth=1, label=r"$\sigma^2 = \alpha T \tau$")

    fit = analysis.fits.get("variance_vs_temperature_times_time")
    title = "Variance against the harmonic prediction"
    if fit is not None:
        interval = _format_interval(fit.exponent_ci)
        title += f"\nslope {fit.exponent:.2f} {interval}, r = {fit.pearson_r:.2f}"
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel(r"$\alpha T_i \tau_i$ (weight units$^2$)")
    axes.set_ylabel(r"variance $\sigma_i^2$ (weight units$^2$)")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    return _save_figure(figure, path)


def plot_variance_flatness_contrast(
    sgd_variances: np.ndarray,
    sgd_flatness: np.ndarray,
    sgd_fit: VarianceFlatnessFit | None,
    contrast: LangevinContrast,
    path: str | Path,
) -> Path:
    """Draw ``sigma_i^2`` against ``F_i`` for SGD and for Langevin dynamics on one log-log plot."""
    figure, axes = plt.subplots(figsize=(5.8, 4.4))
    series = [
        ("SGD", np.asarray(sgd_variances, float), np.asarray(sgd_flatness, float), sgd_fit, "C0"),
        (
            f"Langevin, T = {contrast.langevin.trajectory.temperature:.2g}",
            contrast.variances,
            contrast.flatness.flatness.double().numpy(),
            contrast.psi_fit,
            "C3",
        ),
    ]
    for label, variances, flatness, fit, colour in series:
        usable = np.isfinite(flatness) & (flatness > 0) & (variances > 0)
        if fit is not None:
            label += rf", $\psi$ = {fit.psi:.2f} {_format_interval(fit.psi_ci)}"
        axes.scatter(flatness[usable], variances[usable], s=10, color=colour, label=label)
        if fit is not None and usable.any():
            line = np.geomspace(flatness[usable].min(), flatness[usable].max(), 30)
            axes.plot(
                line, np.exp(fit.intercept) * line ** (-fit.psi), "-", color=colour, linewidth=1
            )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel(r"flatness $F_i$ (weight units)")
    axes.set_ylabel(r"variance $\sigma_i^2$ (weight units$^2$)")
    axes.set_title(r"$\sigma_i^2 \propto F_i^{-\psi}$: SGD against equilibrium")
    axes.legend(fontsize=8)
    return _save_figure(figure, path)


def write_theory_figures(
    analysis: RandomLandscapeAnalysis,
    output_dir: str | Path,
    contrast: LangevinContrast | None = None,
    sgd_fit: VarianceFlatnessFit | None = None,
) -> list[str]:
    """Write every random-landscape figure into ``output_dir`` and return the file names.

    The SGD-against-Langevin figure is drawn only when ``contrast`` is given.
    """
    output_dir = Path(output_dir)
    paths = [
        plot_temperature_and_correlation_time(
            analysis, output_dir / "temperature_correlation_time.png"
        ),
        plot_minibatch_minima(analysis, output_dir / "minibatch_minima.png"),
        plot_variance_prediction(analysis, output_dir / "variance_prediction.png"),
    ]
    if contrast is not None:
        paths.append(
            plot_variance_flatness_contrast(
                analysis.variances,
                analysis.flatness,
                sgd_fit,
                contrast,
                output_dir / "variance_flatness_langevin.png",
            )
        )
    return [path.name for path in paths]


def _scatter_with_fit(
    axes: plt.Axes, x: np.ndarray, y: np.ndarray, fit: PowerLawExponent | None, symbol: str
) -> None:
    usable = np.isfinite(x) & (x > 0) & np.isfinite(y) & (y > 0)
    axes.loglog(x[usable], y[usable], ".", markersize=5)
    if fit is not None and usable.any():
        line = np.geomspace(x[usable].min(), x[usable].max(), 30)
        axes.loglog(
            line,
            np.exp(fit.intercept) * line**fit.exponent,
            "-",
            color="C3",
            label=rf"${symbol} \propto F^{{{fit.exponent:.2f}}}$ "
            + _format_interval(fit.exponent_ci),
        )
        axes.legend(fontsize=8)
    axes.set_xlabel(r"flatness $F_i$ (weight units)")


def _format_interval(interval: tuple[float, float]) -> str:
    low, high = interval
    if not (math.isfinite(low) and math.isfinite(high)):
        return ""
    return f"[{low:.2f}, {high:.2f}]"


def _format_exponent(fit: PowerLawExponent | None) -> str:
    if fit is None:
        return "undefined"
    return f"{fit.exponent:.2f} {_format_interval(fit.exponent_ci)}".strip()


def _nan_median(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else math.nan


def _save_figure(figure: plt.Figure, path: str | Path) -> Path:
    # Minor tick labels of log ranges shorter than two decades overlap, so those axes
    # are labelled at 1, 2 and 5 times powers of ten instead.
    for axes in figure.axes:
        low, high = axes.get_xlim()
        if axes.xaxis.get_scale() == "log" and low > 0 and high / low < 100:
            axes.xaxis.set_major_locator(
                matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0))
            )
            axes.xaxis.set_major_formatter(
                matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
            )
            axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
