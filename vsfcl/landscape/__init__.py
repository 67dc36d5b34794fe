"""Loss-landscape analysis of SGD: trajectory PCA, flatness and the variance-flatness relation.

Modules, one per concept: ``trajectory`` (snapshot recording), ``exploration``
(training into the exploration phase and through the window), ``spectrum`` (power law,
cumulative variance, drift), ``profiles`` (batched loss profiles), ``fit`` (the
exponent psi), ``curvature`` (Hessian quadratic forms), ``figures``, ``artifacts``
(atomic outputs), ``pipeline`` (the whole run) and ``cli`` (the Hydra entry point).
"""

from vsfcl.landscape.curvature import compare_curvature_with_flatness, hessian_quadratic_forms
from vsfcl.landscape.fit import VarianceFlatnessFit, fit_variance_flatness
from vsfcl.landscape.profiles import ProfileEvaluator, reference_losses
from vsfcl.landscape.spectrum import (
    PowerLawFit,
    components_to_fraction,
    cumulative_variance_excluding_first,
    drift_statistics,
    fit_power_law,
)
from vsfcl.landscape.trajectory import TrajectoryRecorder, resolve_parameter_names

__all__ = [
    "PowerLawFit",
    "ProfileEvaluator",
    "TrajectoryRecorder",
    "VarianceFlatnessFit",
    "compare_curvature_with_flatness",
    "components_to_fraction",
    "cumulative_variance_excluding_first",
    "drift_statistics",
    "fit_power_law",
    "fit_variance_flatness",
    "hessian_quadratic_forms",
    "reference_losses",
    "resolve_parameter_names",
]
