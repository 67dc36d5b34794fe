"""The landscape analysis from training to summary, with typed settings.

The steps, in order:

1. train an MLP on MNIST into the exploration phase;
2. keep training through a window of epochs, recording snapshots of the analysed
   parameters;
3. run the PCA of the trajectory and fit the variance spectrum;
4. measure the flatness of the loss along the leading principal directions and fit
   ``sigma_i^2 ~ F_i^-psi``;
5. optionally compare flatness with Hessian curvature;
6. write arrays, figures and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from vsfcl.flatness import FlatnessResult
from vsfcl.landscape import figures
from vsfcl.landscape.artifacts import save_arrays, to_json_value, write_json
from vsfcl.landscape.curvature import compare_curvature_with_flatness, hessian_quadratic_forms
from vsfcl.landscape.exploration import (
    ClassificationData,
    ExplorationCriterion,
    TrainingHistory,
    train_to_exploration,
    train_window,
)
from vsfcl.landscape.fit import VarianceFlatnessFit, fit_variance_flatness
from vsfcl.landscape.profiles import ProfileEvaluator
from vsfcl.landscape.spectrum import (
    PowerLawFit,
    components_to_fraction,
    cumulative_variance_excluding_first,
    drift_statistics,
    fit_power_law,
)
from vsfcl.landscape.theory import (
    LangevinSettings,
    TheorySettings,
    analyse_random_landscape,
    run_langevin_contrast,
    write_theory_figures,
)
from vsfcl.landscape.trajectory import TrajectoryRecorder
from vsfcl.models import MLP
from vsfcl.pca import TrajectoryPCA, trajectory_pca

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class TrainingSettings:
    """Data, model and minibatch settings.

    Attributes
    ----------
    seed : int
        Seeds the initialisation, the minibatch order and the training subset.
    device : {"auto", "cpu", "cuda"}
        "auto" picks CUDA when it is available.
    data_root : str or None
        MNIST root folder; None uses the package default.
    train_subset : int or None
        Train and evaluate profiles on this many training samples, drawn at random
        with ``seed``; None uses all 60000.
    hidden_sizes : tuple of int
    activation : str
    batch_size : int
        Minibatch size B.
    """

    seed: int = 0
    device: str = "auto"
    data_root: str | None = None
    train_subset: int | None = None
    hidden_sizes: tuple[int, ...] = (50, 50)
    activation: str = "relu"
    batch_size: int = 50


@dataclass(frozen=True)
class WindowSettings:
    """Snapshot window inside the exploration phase.

    Attributes
    ----------
    window_epochs : int
        Length of the window in epochs.
    snapshot_interval : int
        Iterations between snapshots.
    parameters : tuple of str, or "all"
        Analysed parameters.
    snapshot_dtype : {"float32", "float16"}
    coordinate_stride : int
        Record every k-th entry of the flattened parameters (see
        :class:`~vsfcl.landscape.trajectory.TrajectoryRecorder`).
    max_buffer_gib : float
        Largest snapshot buffer allowed, in GiB.
    """

    window_epochs: int = 10
    snapshot_interval: int = 10
    parameters: tuple[str, ...] | str = ("features.fc2.weight",)
    snapshot_dtype: Literal["float32", "float16"] = "float32"
    coordinate_stride: int = 1
    max_buffer_gib: float = 2.0


@dataclass(frozen=True)
class AnalysisSettings:
    """PCA, flatness, fits and figures.

    Attributes
    ----------
    n_directions : int
        Leading principal directions whose flatness is measured.
    pca_components : int or None
        Components kept by the PCA; None keeps ``min(n_snapshots, n_params)``.
    spectrum_min_index, spectrum_max_index : int, int or None
        1-based range of the power-law fit of the spectrum; None ends at the last
        kept component.
    cumulative_fraction : float
        Fraction of the variance excluding ``i = 1`` that defines ``n90``.
    psi_min_index, psi_max_index : int, int or None
        1-based range of directions in the ``psi`` fit; None ends at ``n_directions``.
    bootstrap_samples : int
    ci_level : float
    initial_step_scale : float
        First bracketing step along ``p_i`` in units of the trajectory's standard
        deviation ``sigma_i``.
    max_offset : float
        Largest offset searched on each side, in weight units.
    flatness_rtol : float
        Relative bracket width (and loss tolerance) at which the crossing refinement
        of :func:`~vsfcl.flatness.find_flatness` stops.
    max_profile_batch : int
        Points evaluated in one vectorised pass.
    chunk_size : int
        Samples per chunk in the profile evaluation.
    response_cache_mib : float
        Memory for the cached per-direction layer responses, in MiB.
    curvature : bool
        Compute ``p_i^T H p_i`` for the analysed directions.
    curvature_chunk_size : int
        Samples per chunk in the Hessian-vector products.
    n_profile_plots : int
        Profiles drawn in the figure.
    trajectory_planes : tuple of (int, int)
        1-based pairs ``(i, j)`` drawn as ``(theta_i, theta_j)`` planes.
    """

    n_directions: int = 100
    pca_components: int | None = None
    spectrum_min_index: int = 20
    spectrum_max_index: int | None = 200
    cumulative_fraction: float = 0.9
    psi_min_index: int = 1
    psi_max_index: int | None = None
    bootstrap_samples: int = 1000
    ci_level: float = 0.95
    initial_step_scale: float = 1.0
    max_offset: float = 20.0
    flatness_rtol: float = 1e-3
    max_profile_batch: int = 64
    chunk_size: int = 512
    response_cache_mib: float = 2048.0
    curvature: bool = True
    curvature_chunk_size: int = 8192
    n_profile_plots: int = 6
    trajectory_planes: tuple[tuple[int, int], ...] = ((1, 2), (49, 50))


@dataclass(frozen=True)
class LandscapeSettings:
    """Every setting of one landscape run."""

    training: TrainingSettings = field(default_factory=TrainingSettings)
    exploration: ExplorationCriterion = field(default_factory=ExplorationCriterion)
    window: WindowSettings = field(default_factory=WindowSettings)
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    optimizer_name: str = "sgd"
    # Learning rate alpha of the optimizer; the effective temperature T_i scales with it.
    learning_rate: float = 0.1
    # Random-landscape statistics and the Langevin contrast; None skips them.
    theory: TheorySettings | None = None
    langevin: LangevinSettings | None = None


def resolve_device(device: str) -> torch.device:
    """Map "auto", "cpu" or "cuda" to a torch device; "auto" prefers CUDA."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is invalid; use 'auto', 'cpu' or 'cuda'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device='cuda' was requested but CUDA is not available; use 'auto' or 'cpu'"
        )
    return torch.device(device)


def load_classification_data(
    settings: TrainingSettings, device: torch.device
) -> ClassificationData:
    """Load MNIST, scale pixels to [0, 1], flatten to 784 features and move to ``device``."""
    from vsfcl.data.mnist import load_mnist

    arrays = load_mnist(settings.data_root)
    train_inputs = arrays.train_images.reshape(arrays.train_images.shape[0], -1).float() / 255.0
    train_targets = arrays.train_labels.long()
    n_train = train_inputs.shape[0]
    if settings.train_subset is not None:
        if not 1 <= settings.train_subset <= n_train:
            raise ValueError(
                f"train_subset={settings.train_subset} must be between 1 and {n_train}, "
                "or null for the whole training set"
            )
        generator = torch.Generator().manual_seed(settings.seed)
        keep = torch.randperm(n_train, generator=generator)[: settings.train_subset]
        train_inputs, train_targets = train_inputs[keep], train_targets[keep]
    test_inputs = arrays.test_images.reshape(arrays.test_images.shape[0], -1).float() / 255.0
    return ClassificationData(
        train_inputs=train_inputs.to(device),
        train_targets=train_targets.to(device),
        test_inputs=test_inputs.to(device),
        test_targets=arrays.test_labels.long().to(device),
    )


@dataclass
class LandscapeAnalysis:
    """Results of the analysis of one trajectory."""

    pca: TrajectoryPCA
    spectrum_fit: PowerLawFit | None
    spectrum_fit_error: str | None
    cumulative: torch.Tensor
    n_at_fraction: int | None
    drift: Any
    flatness: FlatnessResult
    psi_fit: VarianceFlatnessFit | None
    psi_fit_error: str | None
    curvature: torch.Tensor | None
    curvature_comparison: Any
    evaluator: ProfileEvaluator
    n_directions: int


def run_landscape(
    settings: LandscapeSettings, make_optimizer: OptimizerFactory, output_dir: str | Path
) -> dict[str, Any]:
    """Train, record, analyse and write all outputs into ``output_dir``.

    Returns
    -------
    dict
        The summary also written to ``output_dir / "summary.json"``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    started = time.perf_counter()
    training = settings.training

    # Data and model.
    device = resolve_device(training.device)
    torch.manual_seed(training.seed)
    clock = time.perf_counter()
    data = load_classification_data(training, device)
    timing["data_seconds"] = time.perf_counter() - clock
    log.info(
        "Data: %d training and %d test samples on %s",
        data.train_inputs.shape[0],
        data.test_inputs.shape[0],
        device,
    )
    model = MLP(data.train_inputs.shape[1], training.hidden_sizes, 10, training.activation).to(
        device
    )
    optimizer = make_optimizer(model.parameters())
    generator = torch.Generator().manual_seed(training.seed)

    # Training into the exploration phase.
    clock = time.perf_counter()
    history = train_to_exploration(
        model, optimizer, data, training.batch_size, settings.exploration, generator
    )
    timing["exploration_seconds"] = time.perf_counter() - clock

    # Snapshot window.
    clock = time.perf_counter()
    recorder = _make_recorder(model, settings, data.train_inputs.shape[0])
    train_window(
        model,
        optimizer,
        data,
        training.batch_size,
        settings.window.window_epochs,
        settings.window.snapshot_interval,
        recorder.record,
        history,
        generator,
    )
    timing["window_seconds"] = time.perf_counter() - clock

    analysis = analyse_trajectory(model, recorder, data, settings.analysis, timing)

    # Outputs.
    clock = time.perf_counter()
    _save_arrays(output_dir, recorder, analysis)
    figure_paths = _draw_figures(output_dir, recorder, analysis, settings.analysis)
    timing["output_seconds"] = time.perf_counter() - clock

    theory_summary = _analyse_theory(
        model, recorder, data, settings, analysis, output_dir, figure_paths, timing
    )
    timing["total_seconds"] = time.perf_counter() - started
    summary = build_summary(settings, history, recorder, analysis, figure_paths, timing, device)
    summary.update(theory_summary)
    write_json(output_dir / "summary.json", summary)
    log.info(
        "Summary: gamma=%s, n90=%s, psi=%s, psi_ci=%s; outputs in %s",
        summary["gamma"],
        summary["n90"],
        summary["psi"],
        summary["psi_ci"],
        output_dir,
    )
    return summary


def _analyse_theory(
    model: nn.Module,
    recorder: TrajectoryRecorder,
    data: ClassificationData,
    settings: LandscapeSettings,
    analysis: LandscapeAnalysis,
    output_dir: Path,
    figure_paths: list[str],
    timing: dict[str, float],
) -> dict[str, Any]:
    """Measure T_i, tau_i and the minibatch minima, then run the Langevin contrast.

    Returns the ``random_landscape`` and ``langevin`` entries of the summary (empty when
    ``settings.theory`` is None) and appends the figure names to ``figure_paths``. The
    model's parameters must be at their time averages, as :func:`analyse_trajectory`
    leaves them.
    """
    if settings.theory is None:
        return {}
    if settings.optimizer_name != "torch.optim.SGD":
        log.warning(
            "T_i = (alpha/2) <(dL^mu/dtheta_i)^2> assumes plain SGD; with %s it is only indicative",
            settings.optimizer_name,
        )
    clock = time.perf_counter()
    k = analysis.n_directions
    theory = analyse_random_landscape(
        model,
        recorder.parameter_names,
        data.train_inputs,
        data.train_targets,
        settings.training.batch_size,
        settings.learning_rate,
        recorder.time_average(),
        analysis.evaluator.directions,
        analysis.flatness.flatness,
        analysis.pca.variances[:k],
        analysis.pca.projections[:, :k],
        settings.window.snapshot_interval,
        settings.theory,
    )
    timing["random_landscape_seconds"] = time.perf_counter() - clock

    contrast = None
    if settings.langevin is not None:
        clock = time.perf_counter()
        temperature = settings.langevin.temperature or theory.median_temperature()
        langevin = settings.langevin
        n_train = int(data.train_inputs.shape[0])
        if langevin.n_samples is not None and langevin.n_samples > n_train:
            log.warning(
                "theory.langevin.n_samples=%d exceeds the %d training samples; using all of them",
                langevin.n_samples,
                n_train,
            )
            langevin = dataclasses.replace(langevin, n_samples=None)
        contrast = run_langevin_contrast(
            model,
            recorder.parameter_names,
            data.train_inputs,
            data.train_targets,
            settings.learning_rate,
            temperature,
            langevin,
        )
        timing["langevin_seconds"] = time.perf_counter() - clock
    figure_paths.extend(write_theory_figures(theory, output_dir, contrast, analysis.psi_fit))

    result: dict[str, Any] = {"random_landscape": theory.to_summary()}
    if contrast is not None:
        result["langevin"] = contrast.to_summary()
    return result


def _make_recorder(
    model: nn.Module, settings: LandscapeSettings, n_train: int
) -> TrajectoryRecorder:
    window = settings.window
    batch_size = settings.training.batch_size
    if not 1 <= batch_size <= n_train:
        raise ValueError(
            f"batch_size={batch_size} must be between 1 and the {n_train} training samples"
        )
    if window.snapshot_interval < 1:
        raise ValueError(f"snapshot_interval={window.snapshot_interval} must be at least 1")
    iterations = window.window_epochs * (n_train // batch_size)
    n_snapshots = iterations // window.snapshot_interval
    if n_snapshots < 2:
        raise ValueError(
            f"the window has {iterations} iterations, which gives {n_snapshots} snapshots at "
            f"an interval of {window.snapshot_interval}; lengthen window_epochs or shorten "
            "snapshot_interval to get at least 2"
        )
    return TrajectoryRecorder(
        model,
        window.parameters,
        n_snapshots,
        dtype=window.snapshot_dtype,
        coordinate_stride=window.coordinate_stride,
        max_buffer_bytes=int(window.max_buffer_gib * 1024**3),
    )


def analyse_trajectory(
    model: nn.Module,
    recorder: TrajectoryRecorder,
    data: ClassificationData,
    settings: AnalysisSettings,
    timing: dict[str, float],
) -> LandscapeAnalysis:
    """Run the PCA, spectrum statistics, flatness, ``psi`` fit and optional curvature."""
    # PCA of the recorded trajectory.
    clock = time.perf_counter()
    snapshots = recorder.trajectory()
    pca = trajectory_pca(snapshots, n_components=settings.pca_components)
    timing["pca_seconds"] = time.perf_counter() - clock
    log.info(
        "PCA of %d snapshots x %d entries: sigma_1^2=%.3g, total variance %.3g",
        snapshots.shape[0],
        snapshots.shape[1],
        float(pca.variances[0]),
        pca.total_variance,
    )

    # Spectrum statistics.
    spectrum_fit, spectrum_error = None, None
    max_index = settings.spectrum_max_index
    if max_index is None or max_index > pca.n_components:
        max_index = pca.n_components
    try:
        spectrum_fit = fit_power_law(pca.variances, settings.spectrum_min_index, max_index)
    except ValueError as error:
        spectrum_error = str(error)
        log.warning("Power-law fit of the spectrum failed: %s", error)
    cumulative = cumulative_variance_excluding_first(pca.variances, pca.total_variance)
    n_at_fraction = components_to_fraction(
        pca.variances, pca.total_variance, settings.cumulative_fraction
    )
    drift = drift_statistics(pca.projections, pca.directions, pca.mean, snapshots)

    # Loss profiles and flatness at the time-averaged weights.
    with torch.no_grad():
        for name, value in recorder.time_averaged_parameters().items():
            model.get_parameter(name).copy_(value)
    n_directions = min(settings.n_directions, pca.n_components)
    directions = recorder.embed(pca.directions[:n_directions])
    evaluator = ProfileEvaluator(
        model,
        recorder.parameter_names,
        recorder.time_average(),
        directions,
        data.train_inputs,
        data.train_targets,
        max_batch=settings.max_profile_batch,
        chunk_size=settings.chunk_size,
        response_cache_bytes=int(settings.response_cache_mib * 1024**2),
    )
    clock = time.perf_counter()
    flatness = evaluator.flatness(
        pca.variances[:n_directions],
        settings.initial_step_scale,
        settings.max_offset,
        settings.flatness_rtol,
    )
    loss0 = flatness.loss0
    timing["flatness_seconds"] = time.perf_counter() - clock
    n_censored = int(flatness.censored.sum())
    log.info(
        "Flatness of %d directions: L_0=%.5g, %d censored, %d loss evaluations in %.1f s",
        n_directions,
        loss0,
        n_censored,
        flatness.n_evaluations,
        timing["flatness_seconds"],
    )

    # Inverse variance-flatness fit.
    psi_fit, psi_error = None, None
    psi_max = settings.psi_max_index if settings.psi_max_index is not None else n_directions
    try:
        psi_fit = fit_variance_flatness(
            pca.variances[:n_directions],
            flatness.flatness,
            settings.psi_min_index,
            min(psi_max, n_directions),
            settings.bootstrap_samples,
            settings.ci_level,
        )
    except ValueError as error:
        psi_error = str(error)
        log.warning("Variance-flatness fit failed: %s", error)

    # Hessian curvature along the same directions.
    curvature, comparison = None, None
    if settings.curvature:
        clock = time.perf_counter()
        curvature = hessian_quadratic_forms(
            evaluator.loss_terms(settings.curvature_chunk_size),
            evaluator.center,
            evaluator.directions,
        )
        comparison = compare_curvature_with_flatness(curvature, flatness.flatness)
        timing["curvature_seconds"] = time.perf_counter() - clock

    return LandscapeAnalysis(
        pca=pca,
        spectrum_fit=spectrum_fit,
        spectrum_fit_error=spectrum_error,
        cumulative=cumulative,
        n_at_fraction=n_at_fraction,
        drift=drift,
        flatness=flatness,
        psi_fit=psi_fit,
        psi_fit_error=psi_error,
        curvature=curvature,
        curvature_comparison=comparison,
        evaluator=evaluator,
        n_directions=n_directions,
    )


def _save_arrays(
    output_dir: Path, recorder: TrajectoryRecorder, analysis: LandscapeAnalysis
) -> None:
    save_arrays(
        output_dir / "trajectory.npz",
        snapshots=recorder.trajectory(),
        iterations=recorder.iterations[: recorder.n_recorded_snapshots],
        recorded_index=recorder.recorded_index,
        time_average=recorder.time_average(),
        parameter_names=np.array(recorder.parameter_names),
    )
    pca = analysis.pca
    flatness = analysis.flatness
    save_arrays(
        output_dir / "pca.npz",
        mean=pca.mean,
        variances=pca.variances,
        total_variance=np.array(pca.total_variance),
        projections=pca.projections,
        directions=pca.directions[: analysis.n_directions],
        flatness=flatness.flatness,
        flatness_left=flatness.left,
        flatness_right=flatness.right,
        censored=flatness.censored,
        curvature=analysis.curvature if analysis.curvature is not None else np.array([]),
    )


def _draw_figures(
    output_dir: Path,
    recorder: TrajectoryRecorder,
    analysis: LandscapeAnalysis,
    settings: AnalysisSettings,
) -> list[str]:
    pca = analysis.pca
    flatness = analysis.flatness
    paths = [
        figures.plot_variance_spectrum(
            pca.variances.numpy(), analysis.spectrum_fit, output_dir / "spectrum.png"
        ),
        figures.plot_cumulative_variance(
            analysis.cumulative.numpy(),
            analysis.n_at_fraction,
            settings.cumulative_fraction,
            recorder.n_params,
            output_dir / "cumulative_variance.png",
        ),
        figures.plot_trajectory_planes(
            pca.projections.numpy(),
            recorder.iterations[: recorder.n_recorded_snapshots].numpy(),
            settings.trajectory_planes,
            output_dir / "trajectory_planes.png",
        ),
    ]

    # A sample of profiles on one offset grid wide enough for the flattest one drawn.
    chosen = _profile_sample(analysis.n_directions, settings.n_profile_plots)
    half_widths = torch.stack([flatness.left[chosen].abs(), flatness.right[chosen]]).double()
    finite = half_widths[torch.isfinite(half_widths)]
    reach = 1.5 * float(finite.max()) if finite.numel() else settings.max_offset
    offsets = torch.linspace(-reach, reach, 61, dtype=torch.float64)
    profiles = analysis.evaluator.profile_grid(chosen, offsets)
    paths.append(
        figures.plot_loss_profiles(
            offsets.numpy(),
            profiles.numpy(),
            chosen,
            flatness.loss0,
            flatness.level,
            output_dir / "loss_profiles.png",
        )
    )
    paths.append(
        figures.plot_variance_flatness(
            pca.variances[: analysis.n_directions].numpy(),
            flatness.flatness.numpy(),
            analysis.psi_fit,
            output_dir / "variance_flatness.png",
        )
    )
    if analysis.curvature is not None:
        paths.append(
            figures.plot_curvature_flatness(
                analysis.curvature.numpy(),
                flatness.flatness.numpy(),
                flatness.loss0,
                output_dir / "curvature_flatness.png",
            )
        )
    return [path.name for path in paths]


def _profile_sample(n_directions: int, n_plots: int) -> list[int]:
    """Pick up to ``n_plots`` 0-based direction indices spread evenly on a log scale."""
    if n_plots < 1:
        return [0]
    ranks = np.unique(np.round(np.geomspace(1, n_directions, n_plots)).astype(int))
    return [int(rank) - 1 for rank in ranks]


def build_summary(
    settings: LandscapeSettings,
    history: TrainingHistory,
    recorder: TrajectoryRecorder,
    analysis: LandscapeAnalysis,
    figure_paths: list[str],
    timing: dict[str, float],
    device: torch.device,
) -> dict[str, Any]:
    """Assemble ``summary.json``: every undefined value is null with a reason in ``null_reasons``."""
    reasons: dict[str, str] = {}
    pca = analysis.pca
    flatness = analysis.flatness
    spectrum_fit = analysis.spectrum_fit
    psi_fit = analysis.psi_fit

    def value(key: str, item: Any, reason: str) -> Any:
        return to_json_value(item, key, reasons, reason)

    summary: dict[str, Any] = {
        "gamma": value(
            "gamma",
            spectrum_fit.gamma if spectrum_fit else None,
            f"power-law fit failed: {analysis.spectrum_fit_error}",
        ),
        "n90": value(
            "n90",
            analysis.n_at_fraction,
            "the kept PCA components do not reach the fraction; keep more components",
        ),
        "psi": value(
            "psi",
            psi_fit.psi if psi_fit else None,
            f"variance-flatness fit failed: {analysis.psi_fit_error}",
        ),
        "psi_ci": value(
            "psi_ci",
            list(psi_fit.psi_ci) if psi_fit else None,
            "no fit, or fewer than 2 bootstrap resamples with spread in log F",
        ),
        "n_directions": analysis.n_directions,
        "n_censored": int(flatness.censored.sum()),
        "variance": value("variance", pca.variances[: analysis.n_directions], "zero variance"),
        "flatness": value(
            "flatness",
            flatness.flatness,
            "censored: the profile did not reach e*L0 within max_offset on one side",
        ),
        "curvature": value(
            "curvature", analysis.curvature, "curvature disabled (analysis.curvature=false)"
        ),
        "loss0": flatness.loss0,
        "level": flatness.level,
        "exploration": {
            "criterion": asdict(settings.exploration),
            "reached": history.exploration_reached,
            "epoch": value(
                "exploration.epoch",
                history.exploration_epoch,
                "the criterion was not met within max_epochs",
            ),
            "history": [asdict(record) for record in history.records],
        },
        "spectrum_fit": value(
            "spectrum_fit",
            asdict(spectrum_fit) if spectrum_fit else None,
            f"power-law fit failed: {analysis.spectrum_fit_error}",
        ),
        "cumulative_fraction": settings.analysis.cumulative_fraction,
        "psi_fit": value(
            "psi_fit",
            _psi_fit_summary(psi_fit),
            f"variance-flatness fit failed: {analysis.psi_fit_error}",
        ),
        "curvature_comparison": value(
            "curvature_comparison",
            asdict(analysis.curvature_comparison) if analysis.curvature_comparison else None,
            "curvature disabled, or fewer than 3 directions with finite flatness and positive curvature",
        ),
        "drift": value(
            "drift",
            asdict(analysis.drift),
            "undefined when a component has zero variance or there is one component",
        ),
        "trajectory": {
            "parameters": recorder.parameter_names,
            "n_params": recorder.n_params,
            "n_recorded_entries": int(recorder.recorded_index.numel()),
            "n_snapshots": recorder.n_recorded_snapshots,
            "n_components": pca.n_components,
            "total_variance": pca.total_variance,
        },
        "flatness_search": {
            "n_evaluations": flatness.n_evaluations,
            "max_offset": settings.analysis.max_offset,
            "initial_step_scale": settings.analysis.initial_step_scale,
            "rtol": settings.analysis.flatness_rtol,
            "evaluator_points": analysis.evaluator.n_points_evaluated,
            "evaluator_seconds": analysis.evaluator.seconds,
        },
        "settings": value("settings", _settings_summary(settings), "unset"),
        "device": str(device),
        "figures": figure_paths,
        "timing": timing,
    }
    summary["null_reasons"] = reasons
    return summary


def _psi_fit_summary(fit: VarianceFlatnessFit | None) -> dict[str, Any] | None:
    if fit is None:
        return None
    return {
        "psi": fit.psi,
        "psi_ci": list(fit.psi_ci),
        "ci_level": fit.ci_level,
        "pearson_r": fit.pearson_r,
        "intercept": fit.intercept,
        "used_indices_1based": [index + 1 for index in fit.used_indices],
        "n_censored_in_range": fit.n_censored,
        "n_bootstrap": fit.n_bootstrap,
    }


def _settings_summary(settings: LandscapeSettings) -> dict[str, Any]:
    summary = asdict(settings)
    # Tuples become lists so that the JSON shows plain arrays.
    summary["window"]["parameters"] = (
        list(settings.window.parameters)
        if not isinstance(settings.window.parameters, str)
        else settings.window.parameters
    )
    return summary
