"""Property-based tests of the numerical core: trajectory PCA, the penalty and flatness."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vsfcl.flatness import curvature_from_flatness, find_flatness
from vsfcl.pca import trajectory_pca
from vsfcl.regularizer import SharpSubspace, SubspacePenalty

MODEST = settings(max_examples=25, deadline=None)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthonormal_rows(n_rows: int, n_columns: int, generator: torch.Generator) -> torch.Tensor:
    matrix = torch.randn(n_columns, n_rows, generator=generator, dtype=torch.float64)
    return torch.linalg.qr(matrix)[0].T


# ---------------------------------------------------------------------------
# PCA
# ---------------------------------------------------------------------------


@MODEST
@given(
    n_snapshots=st.integers(3, 14),
    n_params=st.integers(2, 16),
    seed=st.integers(0, 2**31 - 1),
    method=st.sampled_from(["exact", "lowrank"]),
)
def test_pca_invariants(n_snapshots, n_params, seed, method):
    generator = _generator(seed)
    scales = torch.rand(n_params, generator=generator, dtype=torch.float64) * 3 + 0.1
    snapshots = (
        torch.randn(n_snapshots, n_params, generator=generator, dtype=torch.float64) * scales + 2.0
    )
    # n centred snapshots span at most n - 1 directions.
    n_components = min(n_snapshots - 1, n_params)
    pca = trajectory_pca(snapshots, n_components=n_components, method=method)

    gram = pca.directions @ pca.directions.T
    torch.testing.assert_close(
        gram, torch.eye(n_components, dtype=torch.float64), rtol=0, atol=1e-8
    )
    assert bool(torch.all(pca.variances[1:] <= pca.variances[:-1] * (1 + 1e-10) + 1e-12))
    assert bool(torch.all(pca.variances >= 0))
    assert float(pca.variances.sum()) <= pca.total_variance * (1 + 1e-9) + 1e-12
    # Every direction with variance is kept, so the components rebuild the snapshots.
    reconstructed = pca.mean + pca.projections @ pca.directions
    torch.testing.assert_close(reconstructed, snapshots, rtol=0, atol=1e-7)
    assert float(pca.variances.sum()) == pytest.approx(pca.total_variance, rel=1e-8, abs=1e-12)


@MODEST
@given(
    n_snapshots=st.integers(3, 14),
    n_params=st.integers(2, 16),
    keep=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_pca_truncated_variances_bounded_by_total(n_snapshots, n_params, keep, seed):
    snapshots = torch.randn(n_snapshots, n_params, generator=_generator(seed), dtype=torch.float64)
    n_components = min(keep, n_snapshots - 1, n_params)
    pca = trajectory_pca(snapshots, n_components=n_components)
    assert pca.n_components == n_components
    assert float(pca.variances.sum()) <= pca.total_variance * (1 + 1e-9)
    # The variance along each direction is the mean squared projection.
    torch.testing.assert_close(
        pca.projections.pow(2).mean(dim=0), pca.variances, rtol=1e-8, atol=1e-12
    )


# ---------------------------------------------------------------------------
# Penalty
# ---------------------------------------------------------------------------


@st.composite
def penalties(draw):
    n_params = draw(st.integers(2, 20))
    seed = draw(st.integers(0, 2**31 - 1))
    n_subspaces = draw(st.integers(1, 3))
    generator = _generator(seed)
    subspaces = []
    for experience in range(n_subspaces):
        n_directions = draw(st.integers(1, min(5, n_params)))
        subspaces.append(
            SharpSubspace(
                anchor=torch.randn(n_params, generator=generator, dtype=torch.float64),
                directions=_orthonormal_rows(n_directions, n_params, generator),
                stiffness=torch.rand(n_directions, generator=generator, dtype=torch.float64) * 10,
                experience=experience,
            )
        )
    weights = torch.randn(n_params, generator=generator, dtype=torch.float64) * 3
    return subspaces, weights


@MODEST
@given(case=penalties())
def test_penalty_value_and_gradient(case):
    subspaces, weights = case
    penalty = SubspacePenalty()
    for subspace in subspaces:
        penalty.add(subspace)

    expected = sum(
        0.5 * float(torch.sum(s.stiffness * (s.directions @ (weights - s.anchor)) ** 2))
        for s in subspaces
    )
    value = float(penalty(weights))
    assert value >= 0.0
    assert math.isclose(value, expected, rel_tol=1e-10, abs_tol=1e-12)

    variable = weights.clone().requires_grad_(True)
    penalty(variable).backward()
    torch.testing.assert_close(variable.grad, penalty.gradient(weights), rtol=1e-10, atol=1e-10)


@MODEST
@given(case=penalties())
def test_penalty_zero_at_single_anchor(case):
    subspaces, _ = case
    penalty = SubspacePenalty()
    penalty.add(subspaces[0])
    anchor = subspaces[0].anchor
    assert abs(float(penalty(anchor))) <= 1e-20
    torch.testing.assert_close(
        penalty.gradient(anchor), torch.zeros_like(anchor), rtol=0, atol=1e-12
    )


# ---------------------------------------------------------------------------
# Flatness
# ---------------------------------------------------------------------------


@st.composite
def quadratics(draw):
    """A random positive-definite quadratic loss and unit directions through its minimum."""
    n_params = draw(st.integers(2, 6))
    n_directions = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    loss0 = draw(st.floats(0.01, 10.0))
    generator = _generator(seed)
    factor = torch.randn(n_params, n_params, generator=generator, dtype=torch.float64)
    hessian = factor @ factor.T + 0.1 * torch.eye(n_params, dtype=torch.float64)
    directions = torch.randn(n_directions, n_params, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    return hessian, directions, loss0


@MODEST
@given(case=quadratics(), initial_step=st.floats(0.01, 5.0))
def test_flatness_matches_closed_form(case, initial_step):
    hessian, directions, loss0 = case
    curvature = torch.einsum("ip,pq,iq->i", directions, hessian, directions)

    def loss_along(index, offset):
        return loss0 + 0.5 * curvature[index] * offset.double() ** 2

    # L_0 + h theta^2 / 2 = e L_0 at theta = sqrt(2 (e - 1) L_0 / h).
    crossing = torch.sqrt(2 * (math.e - 1) * loss0 / curvature)
    max_offset = float(crossing.max()) * 4
    result = find_flatness(loss_along, len(curvature), loss0, initial_step, max_offset, rtol=1e-7)

    assert not bool(result.censored.any())
    torch.testing.assert_close(result.right, crossing, rtol=1e-5, atol=0)
    torch.testing.assert_close(result.left, -crossing, rtol=1e-5, atol=0)
    torch.testing.assert_close(result.flatness, 2 * crossing, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        curvature_from_flatness(result.flatness, loss0), curvature, rtol=1e-4, atol=0
    )


@MODEST
@given(case=quadratics(), flat=st.integers(0, 3))
def test_flatness_censors_flat_directions(case, flat):
    hessian, directions, loss0 = case
    curvature = torch.einsum("ip,pq,iq->i", directions, hessian, directions)
    flat = min(flat, len(curvature) - 1)
    crossing = torch.sqrt(2 * (math.e - 1) * loss0 / curvature)
    max_offset = float(crossing.max()) * 2
    # Direction `flat` rises so slowly that it stays under e L_0 beyond max_offset.
    curvature[flat] = 2 * (math.e - 1) * loss0 / (4 * max_offset) ** 2

    def loss_along(index, offset):
        return loss0 + 0.5 * curvature[index] * offset.double() ** 2

    result = find_flatness(loss_along, len(curvature), loss0, 0.5, max_offset, rtol=1e-7)
    expected = torch.zeros(len(curvature), dtype=torch.bool)
    expected[flat] = True
    assert torch.equal(result.censored, expected)
    assert math.isnan(float(result.flatness[flat]))
    others = ~expected
    torch.testing.assert_close(result.flatness[others], 2 * crossing[others], rtol=1e-5, atol=0)
