"""Spectrum statistics, trajectory recording and PCA of planted trajectories."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vsfcl.landscape.spectrum import (
    components_to_fraction,
    cumulative_variance_excluding_first,
    drift_statistics,
    fit_power_law,
)
from vsfcl.landscape.trajectory import TrajectoryRecorder, resolve_parameter_names
from vsfcl.pca import trajectory_pca


def _orthonormal_rows(n_rows: int, n_columns: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n_columns, n_rows, generator=generator, dtype=torch.float64))
    return q.T.contiguous()


@pytest.mark.parametrize("gamma", [1.5, 2.5, 3.0])
def test_power_law_recovered(gamma: float) -> None:
    generator = torch.Generator().manual_seed(1)
    index = torch.arange(1, 501, dtype=torch.float64)
    noise = torch.exp(0.05 * torch.randn(500, generator=generator, dtype=torch.float64))
    variances = 3.0 * index.pow(-gamma) * noise
    fit = fit_power_law(variances, min_index=20, max_index=400)
    # Tolerance: 5% log-normal noise on 381 points moves the slope by well under 0.02.
    assert fit.gamma == pytest.approx(gamma, abs=0.02)
    assert fit.r_squared > 0.99
    assert fit.min_index == 20
    assert fit.max_index == 400


def test_power_law_exact_amplitude() -> None:
    index = torch.arange(1, 101, dtype=torch.float64)
    fit = fit_power_law(2.0 * index.pow(-2.0), min_index=1, max_index=None)
    assert fit.gamma == pytest.approx(2.0, rel=1e-10)
    assert fit.amplitude == pytest.approx(2.0, rel=1e-10)
    assert fit.max_index == 100


def test_power_law_rejects_bad_range() -> None:
    variances = torch.ones(50)
    with pytest.raises(ValueError, match="exceeds the 50 available components"):
        fit_power_law(variances, min_index=20, max_index=60)
    with pytest.raises(ValueError, match="fit range \\[30, 30\\] is invalid"):
        fit_power_law(variances, min_index=30, max_index=30)
    with pytest.raises(ValueError, match="only 0 positive variances"):
        fit_power_law(torch.zeros(50), min_index=1, max_index=50)


def test_cumulative_variance_definition() -> None:
    variances = torch.tensor([10.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    cumulative = cumulative_variance_excluding_first(variances, float(variances.sum()))
    # C(n) = sum_{i=2..n} / sum_{i>=2}, with sum_{i>=2} = 10.
    torch.testing.assert_close(
        cumulative, torch.tensor([0.4, 0.7, 0.9, 1.0], dtype=torch.float64), rtol=0, atol=1e-12
    )
    assert components_to_fraction(variances, float(variances.sum()), 0.9) == 4
    assert components_to_fraction(variances, float(variances.sum()), 0.5) == 3


def test_n90_uses_total_of_truncated_spectrum() -> None:
    variances = torch.tensor([10.0, 4.0, 3.0], dtype=torch.float64)
    # Seven more units of variance sit in components that were not kept.
    assert components_to_fraction(variances, 24.0, 0.9) is None
    assert components_to_fraction(variances, 24.0, 0.5) == 3


def test_pca_of_planted_trajectory() -> None:
    n_snapshots, n_params = 400, 60
    planted = torch.tensor([4.0, 1.0, 0.25, 0.0625], dtype=torch.float64)
    directions = _orthonormal_rows(4, n_params, seed=2)
    time = torch.arange(n_snapshots, dtype=torch.float64)
    # Cosines of distinct whole frequencies have zero mean and are orthogonal over the
    # window, so the time-averaged variance of theta_i is exactly planted[i].
    frequencies = torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=torch.float64)
    theta = torch.sqrt(2 * planted) * torch.cos(
        2 * math.pi * frequencies * time[:, None] / n_snapshots
    )
    offset = torch.linspace(-1, 1, n_params, dtype=torch.float64)
    snapshots = offset + theta @ directions

    result = trajectory_pca(snapshots, n_components=4)
    torch.testing.assert_close(result.variances, planted, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(result.mean, offset, rtol=0, atol=1e-12)
    overlaps = (result.directions @ directions.T).abs()
    torch.testing.assert_close(overlaps, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-9)


def test_recorder_feeds_pca_with_planted_variances() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    names = resolve_parameter_names(model, ["0.weight"])
    assert names == ["0.weight"]
    planted = torch.tensor([0.5, 0.125], dtype=torch.float64)
    directions = _orthonormal_rows(2, 30, seed=3)
    n_snapshots = 200
    recorder = TrajectoryRecorder(model, names, n_snapshots)
    center = model[0].weight.detach().double().reshape(-1).clone()
    for step in range(n_snapshots):
        phase = 2 * math.pi * step / n_snapshots
        theta = torch.sqrt(2 * planted) * torch.tensor([math.cos(phase), math.sin(3 * phase)])
        with torch.no_grad():
            model[0].weight.copy_((center + theta @ directions).reshape(5, 6))
        recorder.record(step)

    result = trajectory_pca(recorder.trajectory().double(), n_components=2)
    # float32 storage limits the match to about 1e-6 relative.
    torch.testing.assert_close(result.variances, planted, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(recorder.time_average().double(), center, rtol=0, atol=1e-6)
    assert recorder.n_recorded_snapshots == n_snapshots
    with pytest.raises(RuntimeError, match="buffer is full"):
        recorder.record(n_snapshots)


def test_recorder_stride_and_float16() -> None:
    model = nn.Sequential(nn.Linear(10, 10))
    recorder = TrajectoryRecorder(model, "all", 3, dtype="float16", coordinate_stride=4)
    assert recorder.n_params == 110
    assert recorder.recorded_index.tolist() == list(range(0, 110, 4))
    recorder.record(1)
    assert recorder.snapshots.dtype == torch.float16
    flat = torch.cat([model[0].weight.reshape(-1), model[0].bias]).detach()
    torch.testing.assert_close(recorder.trajectory()[0], flat[::4], rtol=1e-3, atol=1e-3)
    # The time average covers every entry, not only the recorded ones.
    torch.testing.assert_close(recorder.time_average(), flat, rtol=1e-6, atol=1e-7)
    embedded = recorder.embed(torch.ones(2, recorder.recorded_index.numel()))
    assert embedded.shape == (2, 110)
    assert float(embedded.sum()) == 2 * 28


def test_recorder_rejects_bad_input() -> None:
    model = nn.Sequential(nn.Linear(1000, 1000))
    with pytest.raises(ValueError, match="needs 3.73 GiB.*float16"):
        TrajectoryRecorder(model, "all", 1000, max_buffer_bytes=2 * 1024**3)
    with pytest.raises(ValueError, match="not trainable parameters of the model"):
        TrajectoryRecorder(model, ["features.fc2.weight"], 10)
    with pytest.raises(ValueError, match="n_snapshots=1 must be at least 2"):
        TrajectoryRecorder(model, "all", 1)
    with pytest.raises(ValueError, match="dtype='bfloat16' is invalid"):
        TrajectoryRecorder(model, "all", 10, dtype="bfloat16")  # type: ignore[arg-type]


def test_drift_of_linear_motion_along_mean() -> None:
    n_snapshots, n_params = 200, 200
    generator = torch.Generator().manual_seed(4)
    mean = torch.randn(n_params, generator=generator, dtype=torch.float64)
    unit_mean = mean / mean.norm()
    time = torch.linspace(-1, 1, n_snapshots, dtype=torch.float64)
    diffusion = 0.01 * torch.randn(n_snapshots, n_params, generator=generator, dtype=torch.float64)
    snapshots = mean + time[:, None] * unit_mean + diffusion
    pca = trajectory_pca(snapshots, n_components=10)
    drift = drift_statistics(pca.projections, pca.directions, pca.mean, snapshots)
    # A linear ramp over the window has displacement / std = sqrt(12) (with the
    # endpoints at +-1 exactly, slightly more from the discrete grid).
    assert drift.theta1_displacement_ratio == pytest.approx(math.sqrt(12), rel=0.03)
    assert drift.p1_mean_alignment == pytest.approx(1.0, abs=1e-3)
    assert drift.random_alignment_scale == pytest.approx(
        math.sqrt(2 / (math.pi * n_params)), rel=1e-12
    )
    assert drift.weight_norm_change > 1.5
