import pytest
import torch

from vsfcl.pca import remove_linear_drift, trajectory_pca


def _planted(n_snapshots=3000, n_params=200, stds=(5.0, 3.0, 2.0, 1.0, 0.5), seed=0):
    generator = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(
        torch.randn(n_params, len(stds), generator=generator, dtype=torch.float64)
    )[0].T
    coordinates = torch.randn(n_snapshots, len(stds), generator=generator, dtype=torch.float64)
    coordinates = coordinates - coordinates.mean(0)
    # Whiten the sample so that the planted variances hold exactly.
    coordinates = (
        coordinates
        @ torch.linalg.inv(torch.linalg.cholesky(coordinates.T @ coordinates / n_snapshots)).T
    )
    coordinates = coordinates * torch.tensor(stds, dtype=torch.float64)
    return coordinates @ directions + 1.5, directions, torch.tensor(stds, dtype=torch.float64) ** 2


@pytest.mark.parametrize("method", ["exact", "lowrank"])
def test_pca_recovers_planted_directions(method):
    snapshots, directions, variances = _planted()
    pca = trajectory_pca(snapshots, n_components=5, method=method)
    torch.testing.assert_close(pca.variances, variances, rtol=1e-6, atol=1e-8)
    overlap = (pca.directions @ directions.T).abs()
    torch.testing.assert_close(overlap, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        pca.mean, torch.full((200,), 1.5, dtype=torch.float64), rtol=0, atol=1e-10
    )


def test_pca_covariance_path_when_params_fewer_than_snapshots():
    snapshots, _, variances = _planted(n_snapshots=500, n_params=20)
    pca = trajectory_pca(snapshots, n_components=5, method="exact")
    torch.testing.assert_close(pca.variances, variances, rtol=1e-6, atol=1e-8)


def test_pca_of_straight_line_finds_its_direction():
    direction = torch.tensor([3.0, 4.0, 0.0]) / 5.0
    times = torch.linspace(-1, 1, 11)
    pca = trajectory_pca(times[:, None] * direction, n_components=1)
    assert abs(float(pca.directions[0] @ direction)) == pytest.approx(1.0, abs=1e-6)
    assert float(pca.variances[0]) == pytest.approx(float(times.pow(2).mean()), rel=1e-5)


def test_pca_projections_reconstruct_centred_snapshots():
    snapshots, _, _ = _planted(n_snapshots=50, n_params=30)
    pca = trajectory_pca(snapshots)
    reconstructed = pca.mean + pca.projections @ pca.directions
    torch.testing.assert_close(reconstructed, snapshots, rtol=1e-8, atol=1e-8)
    assert pca.total_variance == pytest.approx(float(pca.variances.sum()), rel=1e-9)


def test_pca_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 snapshots"):
        trajectory_pca(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="n_components=9 is out of range"):
        trajectory_pca(torch.zeros(4, 5), n_components=9)
    with pytest.raises(ValueError, match="shape"):
        trajectory_pca(torch.zeros(4))


def test_single_precision_matches_double_on_leading_components():
    generator = torch.Generator().manual_seed(3)
    scales = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    snapshots = torch.randn(60, 5, generator=generator, dtype=torch.float64) * scales
    snapshots = snapshots @ torch.linalg.qr(torch.randn(400, 5, dtype=torch.float64))[0].T
    double = trajectory_pca(snapshots, 3)
    single = trajectory_pca(snapshots, 3, precision=torch.float32)
    torch.testing.assert_close(single.variances, double.variances, rtol=1e-4, atol=0.0)
    torch.testing.assert_close(single.directions, double.directions, rtol=0.0, atol=1e-4)
    with pytest.raises(ValueError, match="precision=torch.float16 is invalid"):
        trajectory_pca(snapshots, 3, precision=torch.float16)


def test_remove_linear_drift_leaves_the_fluctuations():
    times = torch.arange(30, dtype=torch.float64)[:, None]
    fluctuation = torch.sin(times * 2.0 * torch.pi / 30.0) * torch.tensor([[0.0, 1.0, 0.0]])
    drift = times * torch.tensor([[0.5, 0.0, -0.2]]) + torch.tensor([[1.0, 2.0, 3.0]])
    residual = remove_linear_drift(drift + fluctuation)
    # The drift goes; the sine keeps its shape up to its own small linear part.
    assert float(residual[:, [0, 2]].abs().max()) < 1e-12
    assert float(residual[:, 1].std()) > 0.4
    assert float(trajectory_pca(residual, 1).directions[0, 1].abs()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="n_snapshots >= 3"):
        remove_linear_drift(torch.zeros(2, 3))
