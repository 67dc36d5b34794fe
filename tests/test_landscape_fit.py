"""Flatness of analytic profiles and the fit of sigma^2 ~ F^-psi."""

from __future__ import annotations

import math

import pytest
import torch

from vsfcl.flatness import find_flatness
from vsfcl.landscape.fit import fit_variance_flatness

LOSS0 = 0.05


def _analytic_loss_along(widths: torch.Tensor, power: int, saturating: set[int] = frozenset()):
    """Profiles L0 (1 + (theta / a_i)^power); saturating directions level off below e L0."""

    def loss_along(direction_index: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        a = widths[direction_index]
        rise = (offset / a).abs().pow(power)
        for index in saturating:
            chosen = direction_index == index
            # Bounded by (e - 1) / 2, so the profile never reaches e L0.
            rise[chosen] = 0.5 * (math.e - 1) * torch.tanh(offset[chosen] / a[chosen]).pow(2)
        return LOSS0 * (1.0 + rise)

    return loss_along


@pytest.mark.parametrize(
    ("power", "half_width_factor"),
    [(2, math.sqrt(math.e - 1)), (4, (math.e - 1) ** 0.25)],
    ids=["quadratic", "quartic"],
)
def test_flatness_of_analytic_bowls(power: int, half_width_factor: float) -> None:
    widths = torch.tensor([0.01, 0.3, 1.0, 7.0], dtype=torch.float64)
    result = find_flatness(
        _analytic_loss_along(widths, power),
        4,
        LOSS0,
        initial_step=0.05,
        max_offset=100.0,
        rtol=1e-6,
    )
    # L0 (1 + (theta/a)^k) = e L0 at |theta| = a (e - 1)^(1/k), so F = 2 a (e - 1)^(1/k).
    expected = 2 * widths * half_width_factor
    torch.testing.assert_close(result.flatness, expected, rtol=1e-5, atol=0)
    assert not bool(result.censored.any())


def test_censored_direction_reported_and_excluded_from_fit() -> None:
    widths = torch.tensor([0.2, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    result = find_flatness(
        _analytic_loss_along(widths, 2, saturating={2}), 5, LOSS0, initial_step=0.1, max_offset=30.0
    )
    assert result.censored.tolist() == [False, False, True, False, False]
    assert math.isnan(float(result.flatness[2]))

    variances = 1e-3 * result.flatness.nan_to_num(1.0).pow(-4.0)
    fit = fit_variance_flatness(variances, result.flatness, n_bootstrap=100)
    assert fit.n_censored == 1
    assert fit.used_indices == [0, 1, 3, 4]
    assert fit.psi == pytest.approx(4.0, rel=1e-9)


def test_psi_recovered_from_planted_relation() -> None:
    generator = torch.Generator().manual_seed(7)
    n_directions = 120
    flatness = torch.exp(
        torch.empty(n_directions, dtype=torch.float64).uniform_(-1.0, 1.5, generator=generator)
    )
    noise = torch.exp(0.3 * torch.randn(n_directions, generator=generator, dtype=torch.float64))
    variances = 2e-4 * flatness.pow(-4.0) * noise

    fit = fit_variance_flatness(variances, flatness, n_bootstrap=2000, seed=1)

    # Tolerance: with 30% log-normal scatter over 2.5 e-folds of F, the slope's
    # standard error is about 0.05; 0.2 is four of them.
    assert fit.psi == pytest.approx(4.0, abs=0.2)
    low, high = fit.psi_ci
    assert low < 4.0 < high
    assert high - low < 0.5
    assert fit.pearson_r < -0.95
    assert fit.n_bootstrap == 2000
    assert fit.used_indices == list(range(n_directions))


def test_psi_fit_index_range() -> None:
    flatness = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    variances = flatness.pow(-2.0)
    variances[0] = 100.0  # an outlier outside the range
    fit = fit_variance_flatness(variances, flatness, min_index=2, max_index=5, n_bootstrap=50)
    assert fit.psi == pytest.approx(2.0, rel=1e-9)
    assert fit.used_indices == [1, 2, 3, 4]


def test_psi_fit_rejects_bad_input() -> None:
    flatness = torch.tensor([1.0, float("nan"), float("nan"), 2.0], dtype=torch.float64)
    variances = torch.ones(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="only 2 of the 4 directions"):
        fit_variance_flatness(variances, flatness)
    with pytest.raises(ValueError, match="fit range \\[3, 9\\] is invalid for 4 directions"):
        fit_variance_flatness(variances, flatness, min_index=3, max_index=9)
    with pytest.raises(ValueError, match="must be 1-D of the same length"):
        fit_variance_flatness(variances[:3], flatness)
    with pytest.raises(ValueError, match="ci_level=1.5 must be in"):
        fit_variance_flatness(variances, flatness.nan_to_num(3.0), ci_level=1.5)
    with pytest.raises(ValueError, match="same flatness"):
        fit_variance_flatness(variances, torch.full((4,), 2.0, dtype=torch.float64))
