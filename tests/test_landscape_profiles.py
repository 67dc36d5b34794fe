"""Batched loss profiles against the one-point-at-a-time reference, and Hessian curvature."""

from __future__ import annotations

import pytest
import torch

from vsfcl.landscape.curvature import compare_curvature_with_flatness, hessian_quadratic_forms
from vsfcl.landscape.profiles import ProfileEvaluator, reference_losses
from vsfcl.landscape.trajectory import flatten_parameters, resolve_parameter_names
from vsfcl.models import MLP


def _problem(n_samples: int = 700, seed: int = 0):
    torch.manual_seed(seed)
    model = MLP(input_size=20, hidden_sizes=(12, 9), n_classes=4).eval()
    inputs = torch.randn(n_samples, 20)
    targets = torch.randint(0, 4, (n_samples,))
    return model, inputs, targets


def _directions(n_directions: int, n_params: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n_params, n_directions, generator=generator))
    return q.T.contiguous()


@pytest.mark.parametrize(
    ("parameters", "cache_activations"),
    [
        (["features.fc2.weight"], True),  # linear-layer shortcut
        (["features.fc2.weight", "features.fc2.bias"], True),  # shortcut with the bias
        (["features.fc2.weight"], False),  # whole model under vmap
        (["features.fc2.weight", "head.weight"], True),  # cached prefix, vmap over the rest
        ("all", True),  # nothing to cache
    ],
)
def test_batched_profiles_match_reference(parameters, cache_activations) -> None:
    model, inputs, targets = _problem()
    names = resolve_parameter_names(model, parameters)
    center = flatten_parameters(model, names)
    directions = _directions(5, center.numel(), seed=1)
    # Chunk and batch sizes that do not divide the data or the points exercise the edges.
    evaluator = ProfileEvaluator(
        model,
        names,
        center,
        directions,
        inputs,
        targets,
        max_batch=7,
        chunk_size=128,
        cache_activations=cache_activations,
    )
    index = torch.arange(17) % 5
    offsets = torch.linspace(-2.0, 3.0, 17, dtype=torch.float64)

    batched = evaluator.losses(index, offsets)
    reference = reference_losses(
        model, names, center, directions, index, offsets, inputs, targets, chunk_size=300
    )

    assert batched.shape == (17,)
    torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-7)
    assert evaluator.n_points_evaluated == 17


def test_center_loss_matches_model() -> None:
    model, inputs, targets = _problem()
    names = ["features.fc2.weight"]
    center = flatten_parameters(model, names)
    evaluator = ProfileEvaluator(
        model, names, center, _directions(3, center.numel(), 2), inputs, targets
    )
    expected = torch.nn.functional.cross_entropy(model(inputs), targets).item()
    assert evaluator.center_loss() == pytest.approx(expected, rel=1e-5)


def test_response_cache_eviction_keeps_results() -> None:
    model, inputs, targets = _problem()
    names = ["features.fc2.weight"]
    center = flatten_parameters(model, names)
    directions = _directions(6, center.numel(), seed=3)
    one_response = inputs.shape[0] * 9 * 4
    small = ProfileEvaluator(
        model, names, center, directions, inputs, targets, response_cache_bytes=2 * one_response
    )
    large = ProfileEvaluator(model, names, center, directions, inputs, targets)
    index = torch.tensor([0, 1, 2, 3, 4, 5, 0, 5])
    offsets = torch.full((8,), 0.7, dtype=torch.float64)
    torch.testing.assert_close(
        small.losses(index, offsets), large.losses(index, offsets), rtol=1e-6, atol=0
    )
    assert len(small._responses) == 2


def test_profile_grid_shape() -> None:
    model, inputs, targets = _problem(n_samples=100)
    names = ["features.fc2.weight"]
    center = flatten_parameters(model, names)
    evaluator = ProfileEvaluator(
        model, names, center, _directions(4, center.numel(), 4), inputs, targets
    )
    grid = evaluator.profile_grid([0, 3], torch.linspace(-1, 1, 5))
    assert grid.shape == (2, 5)
    torch.testing.assert_close(grid[0, 2].item(), evaluator.center_loss(), rtol=1e-6, atol=0)


def test_evaluator_rejects_bad_input() -> None:
    model, inputs, targets = _problem(n_samples=50)
    names = ["features.fc2.weight"]
    center = flatten_parameters(model, names)
    directions = _directions(2, center.numel(), 5)
    with pytest.raises(ValueError, match="do not match a center of 108 entries"):
        ProfileEvaluator(model, names, center, directions[:, :-1], inputs, targets)
    with pytest.raises(ValueError, match="must be non-empty and of the same length"):
        ProfileEvaluator(model, names, center, directions, inputs, targets[:-1])
    with pytest.raises(ValueError, match="max_batch=0 must be at least 1"):
        ProfileEvaluator(model, names, center, directions, inputs, targets, max_batch=0)
    evaluator = ProfileEvaluator(model, names, center, directions, inputs, targets)
    with pytest.raises(ValueError, match="must be 1-D of the same length"):
        evaluator.losses(torch.tensor([0, 1]), torch.tensor([0.5]))


def test_hessian_forms_match_autograd_hessian() -> None:
    model, inputs, targets = _problem(n_samples=300)
    names = ["features.fc2.weight"]
    center = flatten_parameters(model, names)
    directions = _directions(6, center.numel(), seed=6)
    evaluator = ProfileEvaluator(model, names, center, directions, inputs, targets, chunk_size=128)

    forms = hessian_quadratic_forms(
        evaluator.loss_terms(), evaluator.center, evaluator.directions, batch_size=4
    )

    def full_loss(flat: torch.Tensor) -> torch.Tensor:
        return sum(term(flat) for term in evaluator.loss_terms(chunk_size=1000))

    hessian = torch.autograd.functional.hessian(full_loss, center.clone()).double()
    expected = torch.einsum("ip,pq,iq->i", directions.double(), hessian, directions.double())
    torch.testing.assert_close(forms, expected, rtol=1e-4, atol=1e-7)


def test_curvature_comparison_of_quadratic_scaling() -> None:
    flatness = torch.tensor([0.5, 1.0, 2.0, 4.0, float("nan"), 3.0], dtype=torch.float64)
    curvature = 3.0 / flatness.pow(2)
    curvature[5] = -1.0
    comparison = compare_curvature_with_flatness(curvature, flatness)
    assert comparison.slope == pytest.approx(-2.0, rel=1e-9)
    assert comparison.pearson_r == pytest.approx(-1.0, abs=1e-12)
    assert comparison.n_used == 4
    assert comparison.n_nonpositive == 1
