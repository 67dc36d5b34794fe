import math

import pytest
import torch

from vsfcl.regularizer import (
    SharpSubspace,
    SubspacePenalty,
    merge_subspaces,
    stiffness_from_variance,
)


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


def test_merged_penalty_equals_stacked():
    subspaces = [_random_subspace(30, 4, seed=10 + e, experience=e) for e in range(3)]
    stacked, merged = SubspacePenalty(), SubspacePenalty(max_rows=12)
    for subspace in subspaces:
        stacked.add(subspace)
        merged.add(subspace)
    assert merged.n_rows == 12
    assert len(merged) == 1
    generator = torch.Generator().manual_seed(0)
    points = [torch.randn(30, generator=generator, dtype=torch.float64) for _ in range(3)]
    offsets = [float(stacked(w) - merged(w)) for w in points]
    assert offsets == pytest.approx([offsets[0]] * 3, abs=1e-9)
    for w in points:
        torch.testing.assert_close(merged.gradient(w), stacked.gradient(w), rtol=1e-9, atol=1e-10)


def test_capped_merge_keeps_top_eigenpairs():
    subspaces = [_random_subspace(25, 5, seed=20 + e, experience=e) for e in range(3)]
    merged = merge_subspaces(subspaces, max_rows=4)
    summed = sum(s.directions.T @ torch.diag(s.stiffness) @ s.directions for s in subspaces)
    eigenvalues, eigenvectors = torch.linalg.eigh(summed)
    torch.testing.assert_close(merged.stiffness, eigenvalues.flip(0)[:4], rtol=1e-9, atol=1e-10)
    # Same subspace: the projector onto the kept rows matches the top eigenvectors'.
    top = eigenvectors[:, -4:]
    torch.testing.assert_close(
        merged.directions.T @ merged.directions, top @ top.T, rtol=1e-8, atol=1e-9
    )
    assert merged.experience == 2


def test_merge_of_one_subspace_returns_it():
    subspace = _random_subspace(20, 3, seed=30)
    merged = merge_subspaces([subspace], max_rows=3)
    weights = torch.randn(20, dtype=torch.float64)
    single = SubspacePenalty()
    single.add(subspace)
    again = SubspacePenalty()
    again.add(merged)
    torch.testing.assert_close(again(weights), single(weights), rtol=1e-10, atol=1e-12)


def test_parameter_gradient_matches_autograd():
    generator = torch.Generator().manual_seed(1)
    parameters = [
        torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
        for shape in ((4, 5), (4,), (3, 4), (3,))
    ]
    penalty = SubspacePenalty()
    penalty.add(_random_subspace(39, 6, seed=40))
    penalty.add(_random_subspace(39, 2, seed=41, experience=1))
    weights = torch.cat([p.reshape(-1) for p in parameters])
    (3.0 * penalty(weights)).backward()
    expected = [p.grad.clone() for p in parameters]
    for parameter in parameters:
        parameter.grad = torch.ones_like(parameter)
    displacement = penalty.displacement(parameters)
    assert float(penalty.value(displacement)) == pytest.approx(float(penalty(weights)), rel=1e-12)
    penalty.accumulate_gradient(parameters, displacement, scale=3.0)
    for parameter, grad in zip(parameters, expected, strict=True):
        # The gradient is added to what backward left there.
        torch.testing.assert_close(parameter.grad, grad + 1.0, rtol=1e-10, atol=1e-12)


def test_penalty_rejects_other_parameter_size():
    penalty = SubspacePenalty()
    penalty.add(_random_subspace(10, 2, seed=50))
    with pytest.raises(ValueError, match="contain 9 values but the penalty was built for 10"):
        penalty.displacement([torch.zeros(9, dtype=torch.float64)])


def test_penalty_rejects_bad_cap():
    with pytest.raises(ValueError, match="max_rows=0"):
        SubspacePenalty(max_rows=0)
