import math

import pytest
import torch

from vsfcl.regularizer import SharpSubspace, SubspacePenalty, stiffness_from_variance


def _random_subspace(
    n_params: int, n_directions: int, seed: int, experience: int = 0
) -> SharpSubspace:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(
        torch.randn(n_params, n_directions, generator=generator, dtype=torch.float64)
    )[0].T
    anchor = torch.randn(n_params, generator=generator, dtype=torch.float64)
    stiffness = torch.rand(n_directions, generator=generator, dtype=torch.float64) * 5
    return SharpSubspace(
        anchor=anchor, directions=directions, stiffness=stiffness, experience=experience
    )


def test_penalty_zero_at_anchor():
    penalty = SubspacePenalty()
    subspace = _random_subspace(50, 4, seed=0)
    penalty.add(subspace)
    assert float(penalty(subspace.anchor)) == pytest.approx(0.0, abs=1e-20)


def test_penalty_value_matches_definition():
    penalty = SubspacePenalty()
    first, second = _random_subspace(30, 3, seed=1), _random_subspace(30, 5, seed=2, experience=1)
    penalty.add(first)
    penalty.add(second)
    weights = torch.randn(30, dtype=torch.float64)
    expected = 0.0
    for s in (first, second):
        expected += 0.5 * float(torch.sum(s.stiffness * (s.directions @ (weights - s.anchor)) ** 2))
    assert float(penalty(weights)) == pytest.approx(expected, rel=1e-12)
    assert penalty.n_rows == 8


def test_penalty_gradient_matches_analytic():
    penalty = SubspacePenalty()
    penalty.add(_random_subspace(40, 6, seed=3))
    penalty.add(_random_subspace(40, 2, seed=4, experience=1))
    weights = torch.randn(40, dtype=torch.float64, requires_grad=True)
    penalty(weights).backward()
    analytic = penalty.gradient(weights.detach())
    torch.testing.assert_close(weights.grad, analytic, rtol=1e-10, atol=1e-12)


def test_penalty_free_in_flat_directions():
    penalty = SubspacePenalty()
    subspace = _random_subspace(20, 3, seed=5)
    penalty.add(subspace)
    assert torch.allclose(
        penalty.gradient(subspace.anchor), torch.zeros(20, dtype=torch.float64), atol=1e-12
    )
    # A move orthogonal to every kept direction costs nothing.
    free = torch.randn(20, dtype=torch.float64)
    free -= subspace.directions.T @ (subspace.directions @ free)
    assert float(penalty(subspace.anchor + free)) == pytest.approx(0.0, abs=1e-20)


def test_empty_penalty_is_zero():
    penalty = SubspacePenalty()
    assert float(penalty(torch.ones(5))) == 0.0


def test_subspace_rejects_bad_stiffness():
    with pytest.raises(ValueError, match="finite and non-negative"):
        SharpSubspace(torch.zeros(3), torch.eye(3)[:2], torch.tensor([1.0, -1.0]), experience=0)
    with pytest.raises(ValueError, match="finite and non-negative"):
        SharpSubspace(torch.zeros(3), torch.eye(3)[:2], torch.tensor([1.0, math.nan]), experience=0)


def test_penalty_rejects_changed_parameter_count():
    penalty = SubspacePenalty()
    penalty.add(_random_subspace(10, 2, seed=0))
    with pytest.raises(ValueError, match="must not change"):
        penalty.add(_random_subspace(11, 2, seed=1))


def test_stiffness_from_variance_follows_power_law():
    variances = torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)
    stiffness = stiffness_from_variance(variances, psi=4.0)
    # psi = 4 gives k proportional to sigma, scaled so that k_1 = 1 / sigma_1^2.
    expected = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64) / 4.0
    torch.testing.assert_close(stiffness, expected)


def test_stiffness_from_zero_variance_raises():
    with pytest.raises(ValueError, match="identical"):
        stiffness_from_variance(torch.zeros(3))
