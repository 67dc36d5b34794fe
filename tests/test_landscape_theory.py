"""Tests of the minibatch ensemble, the correlation time and Langevin dynamics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from scipy.signal import lfilter

from vsfcl.flatness import find_flatness
from vsfcl.landscape.correlation import autocorrelation, correlation_times
from vsfcl.landscape.langevin import langevin_dynamics, run_langevin
from vsfcl.landscape.minibatch import (
    directional_derivatives,
    draw_minibatches,
    effective_temperature,
    fit_minibatch_minima,
    minibatch_profiles,
    offset_grid,
)
from vsfcl.landscape.profiles import ProfileEvaluator
from vsfcl.landscape.theory import (
    LangevinSettings,
    TheorySettings,
    analyse_random_landscape,
    run_langevin_contrast,
    settings_from_mapping,
    write_theory_figures,
)
from vsfcl.landscape.trajectory import TrajectoryRecorder, flatten_parameters, unflatten_parameters
from vsfcl.models import MLP
from vsfcl.pca import trajectory_pca

ANALYSED = ["features.fc2.weight"]


def _shifted_quadratics(seed: int = 0):
    """Minibatch losses c_mu + k_i (theta - s_mu,i)^2 / 2 on a grid, with their planted values."""
    rng = np.random.default_rng(seed)
    n_minibatches, n_directions, n_offsets = 400, 3, 7
    stiffness = np.array([0.5, 4.0, 30.0])
    shifts = rng.normal(0.0, [0.3, 0.1, 0.02], size=(n_minibatches, n_directions))
    constants = rng.uniform(0.1, 0.2, size=(n_minibatches, 1, 1))
    offsets = offset_grid(np.array([1.0, 0.4, 0.1]), n_offsets)
    losses = constants + 0.5 * stiffness[None, :, None] * (offsets[None] - shifts[:, :, None]) ** 2
    return offsets, losses, stiffness, shifts


def test_minima_fit_recovers_shifts_and_curvature():
    offsets, losses, stiffness, shifts = _shifted_quadratics()

    minima = fit_minibatch_minima(offsets, losses)
    statistics = minima.statistics()

    np.testing.assert_allclose(minima.minimum_offset, shifts, rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        minima.curvature, np.broadcast_to(stiffness, shifts.shape), rtol=1e-9
    )
    np.testing.assert_allclose(statistics["minimum_offset_std"], shifts.std(axis=0), rtol=1e-8)
    np.testing.assert_allclose(statistics["minimum_offset_mean"], shifts.mean(axis=0), atol=1e-9)
    np.testing.assert_allclose(statistics["curvature_std"], 0.0, atol=1e-8)
    assert minima.n_minima.tolist() == [400, 400, 400]


def test_temperature_matches_closed_form():
    offsets, losses, stiffness, shifts = _shifted_quadratics()
    learning_rate = 0.1
    # dL^mu/dtheta at 0 is -k s_mu, and the full loss (the mean) has -k mean(s).
    minibatch_derivatives = -stiffness * shifts
    full_derivatives = -stiffness * shifts.mean(axis=0)
    expected = 0.5 * learning_rate * stiffness**2 * shifts.var(axis=0)

    temperature = effective_temperature(minibatch_derivatives, full_derivatives, learning_rate)
    slopes = fit_minibatch_minima(offsets, losses).slope
    from_profiles = effective_temperature(slopes, full_derivatives, learning_rate)

    np.testing.assert_allclose(temperature, expected, rtol=1e-12)
    np.testing.assert_allclose(from_profiles, expected, rtol=1e-7)


def test_minima_fit_marks_concave_profiles():
    offsets = offset_grid(np.array([1.0, math.nan]), 5)
    losses = np.stack([-(offsets**2), -(offsets**2)])  # concave: no minimum

    minima = fit_minibatch_minima(np.nan_to_num(offsets), np.nan_to_num(losses))
    without_grid = fit_minibatch_minima(offsets, np.nan_to_num(losses))

    assert np.isnan(minima.minimum_offset[:, 0]).all()
    np.testing.assert_allclose(minima.curvature[:, 0], -2.0)
    assert np.isnan(without_grid.curvature[:, 1]).all()
    assert np.isnan(without_grid.statistics()["curvature_mean"][1])


def test_minima_fit_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must have shape"):
        fit_minibatch_minima(np.zeros((2, 5)), np.zeros((3, 2, 4)))
    with pytest.raises(ValueError, match="at least 3"):
        offset_grid(np.ones(2), 2)
    with pytest.raises(ValueError, match="learning_rate"):
        effective_temperature(np.zeros((4, 2)), np.zeros(2), 0.0)


def test_draw_minibatches_like_an_epoch():
    generator = torch.Generator().manual_seed(0)

    indices = draw_minibatches(103, 10, 25, generator)

    assert indices.shape == (25, 10)
    first_epoch = indices[:10].flatten()
    assert first_epoch.unique().numel() == 100
    with pytest.raises(ValueError, match="batch_size"):
        draw_minibatches(5, 10, 1, generator)


def _ornstein_uhlenbeck(tau: float, spacing: float, n_samples: int, seed: int) -> np.ndarray:
    """Sample a unit-variance OU process of correlation time ``tau`` exactly, every ``spacing``."""
    decay = math.exp(-spacing / tau)
    noise = np.random.default_rng(seed).normal(size=n_samples) * math.sqrt(1 - decay**2)
    return lfilter([1.0], [1.0, -decay], noise)


@pytest.mark.parametrize("tau, spacing", [(10.0, 2.0), (40.0, 5.0), (3.0, 1.0)])
def test_correlation_time_of_ornstein_uhlenbeck(tau, spacing):
    series = _ornstein_uhlenbeck(tau, spacing, 60_000, seed=int(tau))
    exact_integrated = 0.5 * spacing / math.tanh(spacing / (2 * tau))

    times = correlation_times(series, sample_spacing=spacing)

    # The integrated time's relative standard error is about sqrt(2 (2M + 1) / n), under
    # 6% for these series; 15% is about 3 standard errors.
    assert times.converged[0]
    assert times.integrated[0] == pytest.approx(exact_integrated, rel=0.15)
    assert times.e_folding[0] == pytest.approx(tau, rel=0.15)


def test_correlation_time_of_white_noise_and_constant():
    rng = np.random.default_rng(1)
    series = np.column_stack([rng.normal(size=5000), np.full(5000, 3.0)])

    rho = autocorrelation(series, max_lag=10)
    times = correlation_times(series, sample_spacing=10.0)

    assert rho[0, 0] == pytest.approx(1.0)
    assert np.abs(rho[1:, 0]).max() < 0.05
    assert times.integrated[0] == pytest.approx(5.0, rel=0.2)  # 1/2 sample, 10 iterations each
    assert np.isnan(times.integrated[1])
    assert not times.converged[1]


def test_correlation_time_flags_window_limited_series():
    # A linear drift never decorrelates within the series.
    times = correlation_times(np.linspace(0.0, 1.0, 200))

    assert not times.converged[0]
    assert times.window[0] == times.max_lag
    with pytest.raises(ValueError, match="NaN"):
        correlation_times(np.array([0.0, math.nan, 1.0]))
    with pytest.raises(ValueError, match="sample_spacing"):
        correlation_times(np.zeros((4, 1)), sample_spacing=0.0)


def test_langevin_variance_on_quadratic():
    learning_rate, temperature, n_chains = 0.01, 0.5, 200
    stiffness = torch.tensor([1.0, 5.0, 20.0], dtype=torch.float64).repeat_interleave(n_chains)

    trajectory = langevin_dynamics(
        lambda w: (stiffness * w, 0.5 * (stiffness * w * w).sum()),
        torch.zeros_like(stiffness),
        learning_rate,
        temperature,
        n_steps=3000,
        snapshot_interval=5,
        generator=torch.Generator().manual_seed(0),
        burn_in=600,
    )
    variance = trajectory.snapshots.double().var(dim=0).view(3, n_chains).mean(dim=1)
    k = stiffness.view(3, n_chains)[:, 0]
    exact = 2 * learning_rate * temperature / (1 - (1 - learning_rate * k) ** 2)

    # About 2000 effective samples per stiffness give a relative error near 3%.
    torch.testing.assert_close(variance, exact, rtol=0.08, atol=0.0)
    torch.testing.assert_close(variance, temperature / k, rtol=0.15, atol=0.0)


def test_langevin_rejects_invalid_settings():
    gradient = lambda w: (w, (w * w).sum())  # noqa: E731
    generator = torch.Generator()
    with pytest.raises(ValueError, match="temperature"):
        langevin_dynamics(gradient, torch.zeros(2), 0.1, -1.0, 10, 1, generator)
    with pytest.raises(ValueError, match="snapshots"):
        langevin_dynamics(gradient, torch.zeros(2), 0.1, 1.0, 3, 2, generator)


@pytest.fixture(scope="module")
def small_mnist(mnist):
    """300 real MNIST training samples, flattened and scaled to [0, 1]."""
    inputs = mnist.train_images[:300].reshape(300, -1).float() / 255.0
    return inputs, mnist.train_labels[:300].long()


def _tiny_model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(784, (12, 10), 10)


@pytest.mark.parametrize("trained", ["analysed", "all"])
def test_langevin_at_zero_temperature_is_gradient_descent(small_mnist, trained):
    inputs, targets = small_mnist
    model = _tiny_model()
    reference = _tiny_model()
    names = (
        ANALYSED if trained == "analysed" else [name for name, _ in reference.named_parameters()]
    )
    optimizer = torch.optim.SGD([reference.get_parameter(name) for name in names], lr=0.05)
    expected = []
    for _ in range(4):
        optimizer.zero_grad()
        F.cross_entropy(reference(inputs), targets).backward()
        optimizer.step()
        expected.append(flatten_parameters(reference, ANALYSED))

    result = run_langevin(
        model,
        ANALYSED,
        inputs,
        targets,
        0.05,
        0.0,
        n_steps=4,
        snapshot_interval=1,
        trained=trained,
        chunk_size=128,
    )

    torch.testing.assert_close(
        result.trajectory.snapshots, torch.stack(expected), rtol=1e-4, atol=1e-6
    )
    assert result.trajectory.time_average.numel() == flatten_parameters(model, names).numel()


def test_directional_derivatives_match_autograd(small_mnist):
    inputs, targets = small_mnist
    model = _tiny_model()
    center = flatten_parameters(model, ANALYSED)
    directions = torch.linalg.qr(
        torch.randn(center.numel(), 3, generator=torch.Generator().manual_seed(2))
    )[0].T
    indices = draw_minibatches(300, 25, 5, torch.Generator().manual_seed(3))

    derivatives = directional_derivatives(
        model, ANALYSED, center, directions, inputs, targets, indices, chunk_size=70
    )

    weight = model.get_parameter(ANALYSED[0])
    for mu in range(5):
        model.zero_grad()
        F.cross_entropy(model(inputs[indices[mu]]), targets[indices[mu]]).backward()
        expected = directions @ weight.grad.reshape(-1)
        torch.testing.assert_close(
            derivatives.minibatch[mu].float(), expected, rtol=1e-4, atol=1e-6
        )
    model.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    expected_full = directions @ weight.grad.reshape(-1)
    torch.testing.assert_close(derivatives.full_batch.float(), expected_full, rtol=1e-4, atol=1e-6)


def test_minibatch_profiles_match_direct_loss(small_mnist):
    inputs, targets = small_mnist
    model = _tiny_model()
    center = flatten_parameters(model, ANALYSED)
    directions = torch.linalg.qr(
        torch.randn(center.numel(), 2, generator=torch.Generator().manual_seed(4))
    )[0].T
    indices = draw_minibatches(300, 20, 3, torch.Generator().manual_seed(5))
    offsets = offset_grid(np.array([0.5, 2.0]), 5)

    losses = minibatch_profiles(
        model, ANALYSED, center, directions, inputs, targets, indices, offsets
    )

    for mu in range(3):
        for i in range(2):
            for j in (0, 3):
                point = center + float(offsets[i, j]) * directions[i]
                parameters = unflatten_parameters(model, ANALYSED, point)
                logits = torch.func.functional_call(model, parameters, (inputs[indices[mu]],))
                expected = float(F.cross_entropy(logits, targets[indices[mu]]).detach())
                assert losses[mu, i, j] == pytest.approx(expected, rel=1e-5)


def test_profile_slopes_agree_with_gradients(small_mnist):
    inputs, targets = small_mnist
    model = _tiny_model()
    center = flatten_parameters(model, ANALYSED)
    directions = torch.linalg.qr(
        torch.randn(center.numel(), 3, generator=torch.Generator().manual_seed(6))
    )[0].T
    indices = draw_minibatches(300, 50, 6, torch.Generator().manual_seed(7))
    offsets = offset_grid(np.full(3, 0.004), 5)

    derivatives = directional_derivatives(
        model, ANALYSED, center, directions, inputs, targets, indices
    )
    losses = minibatch_profiles(
        model, ANALYSED, center, directions, inputs, targets, indices, offsets
    )
    slopes = fit_minibatch_minima(offsets, losses).slope

    np.testing.assert_allclose(slopes, derivatives.minibatch.numpy(), rtol=0.02, atol=1e-4)


def _train_and_record(inputs, targets, n_snapshots: int = 60):
    """Train the tiny MLP with SGD (B = 25, alpha = 0.1) and record fc2 every 2 iterations."""
    model = _tiny_model(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    recorder = TrajectoryRecorder(model, ANALYSED, n_snapshots)
    iteration = 0
    while recorder.n_recorded_snapshots < n_snapshots:
        order = torch.randperm(inputs.shape[0], generator=generator)
        for start in range(0, inputs.shape[0] - 24, 25):
            batch = order[start : start + 25]
            optimizer.zero_grad()
            F.cross_entropy(model(inputs[batch]), targets[batch]).backward()
            optimizer.step()
            iteration += 1
            if (
                iteration > 200
                and iteration % 2 == 0
                and recorder.n_recorded_snapshots < n_snapshots
            ):
                recorder.record(iteration)
    with torch.no_grad():
        for name, value in recorder.time_averaged_parameters().items():
            model.get_parameter(name).copy_(value)
    return model, recorder


def test_analyse_random_landscape_end_to_end(small_mnist, tmp_path):
    inputs, targets = small_mnist
    model, recorder = _train_and_record(inputs, targets)
    pca = trajectory_pca(recorder.trajectory(), n_components=8)
    center = recorder.time_average()
    evaluator = ProfileEvaluator(model, ANALYSED, center, pca.directions, inputs, targets)
    flatness = find_flatness(
        evaluator.loss_along(), 8, evaluator.center_loss(), pca.variances.double().sqrt(), 20.0
    )
    settings = TheorySettings(n_minibatches=12, n_offsets=5, bootstrap_samples=50)

    analysis = analyse_random_landscape(
        model,
        ANALYSED,
        inputs,
        targets,
        25,
        0.1,
        center,
        pca.directions,
        flatness.flatness,
        pca.variances,
        pca.projections,
        2,
        settings,
    )
    contrast = run_langevin_contrast(
        model,
        ANALYSED,
        inputs,
        targets,
        0.1,
        analysis.median_temperature(),
        LangevinSettings(
            n_samples=200,
            n_steps=60,
            burn_in=10,
            snapshot_interval=2,
            n_directions=6,
            bootstrap_samples=50,
        ),
    )
    summary = analysis.to_summary()
    names = write_theory_figures(analysis, tmp_path, contrast, None)

    assert analysis.temperature.shape == (8,)
    assert np.all(analysis.temperature > 0)
    assert np.all(np.isfinite(analysis.correlation.integrated))
    assert np.all(analysis.correlation_time > 0)
    defined = np.isfinite(analysis.flatness)
    assert np.isfinite(analysis.curvature_mean[defined]).all()
    assert set(summary["fits"]) >= {
        "temperature",
        "correlation_time",
        "variance_vs_temperature_times_time",
    }
    json.dumps(summary, allow_nan=False)
    json.dumps(contrast.to_summary(), allow_nan=False)
    assert contrast.langevin.trajectory.snapshots.shape == (30, center.numel())
    assert flatten_parameters(model, ANALYSED).equal(center)  # the contrast left the model alone
    assert sorted(names) == sorted(
        [
            "temperature_correlation_time.png",
            "minibatch_minima.png",
            "variance_prediction.png",
            "variance_flatness_langevin.png",
        ]
    )
    assert all((tmp_path / name).stat().st_size > 1000 for name in names)


def test_analyse_random_landscape_rejects_bad_shapes(small_mnist):
    inputs, targets = small_mnist
    model = _tiny_model()
    center = flatten_parameters(model, ANALYSED)
    directions = torch.eye(center.numel())[:3]
    arguments = dict(
        model=model,
        parameter_names=ANALYSED,
        train_inputs=inputs,
        train_targets=targets,
        batch_size=25,
        learning_rate=0.1,
        center=center,
        directions=directions,
        flatness=torch.ones(3),
        variances=torch.ones(3),
        projections=torch.zeros(10, 3),
        snapshot_interval=1,
    )

    with pytest.raises(ValueError, match="flatness"):
        analyse_random_landscape(**{**arguments, "flatness": torch.ones(4)})
    with pytest.raises(ValueError, match="projections"):
        analyse_random_landscape(**{**arguments, "projections": torch.zeros(10, 2)})
    with pytest.raises(ValueError, match="batch_size"):
        analyse_random_landscape(**{**arguments, "batch_size": 301})
    with pytest.raises(ValueError, match="directions"):
        analyse_random_landscape(**{**arguments, "directions": directions[:, :5]})
    with pytest.raises(ValueError, match="n_offsets"):
        TheorySettings(n_offsets=2)
    with pytest.raises(ValueError, match="offset_scale"):
        TheorySettings(offset_scale="range")


def test_theory_config_composes_into_settings():
    config_dir = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        cfg = compose(
            "landscape",
            overrides=[
                "landscape/theory=default",
                "theory.minibatch.n_minibatches=7",
                "theory.langevin.trained=all",
            ],
        )

    theory, langevin = settings_from_mapping(OmegaConf.to_container(cfg.theory, resolve=True))
    _, disabled = settings_from_mapping({"langevin": {"enabled": False}})

    assert theory.n_minibatches == 7
    assert langevin is not None and langevin.trained == "all"
    assert disabled is None
