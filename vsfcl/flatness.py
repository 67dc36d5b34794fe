"""Flatness of a loss landscape along given directions.

The flatness along a unit direction ``p_i`` is ``F_i = theta_r - theta_l``, where
``theta_l < 0 < theta_r`` are the offsets at which the profile
``L_i(theta) = L(w_0 + theta p_i)`` first reaches ``level_factor * L_0`` on each side
of ``w_0``, with ``L_0 = L(w_0)`` and ``level_factor = e`` (Feng and Tu, PNAS 118,
e2015617118, 2021).

The crossings are found by bracketing and refinement. Each side starts at an initial
step and grows it geometrically until the profile reaches the level, then narrows the
last bracket by safeguarded regula falsi. A side that never reaches the level within ``max_offset`` is censored:
its offset is NaN and the direction's flatness is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# loss_along(direction_index, offset) -> loss, all of shape (n_points,): the loss at
# w_0 + offset[j] * p[direction_index[j]] for each requested point j.
LossAlong = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class FlatnessResult:
    """Crossing offsets and flatness per direction.

    Attributes
    ----------
    left, right : Tensor of shape (n_directions,)
        Offsets ``theta_l < 0`` and ``theta_r > 0`` where the profile reaches the
        level; NaN on a censored side.
    flatness : Tensor of shape (n_directions,)
        ``right - left``; NaN when either side is censored.
    censored : Tensor of shape (n_directions,), dtype bool
        True when at least one side never reached the level within ``max_offset``.
    loss0 : float
        Loss ``L_0`` at the centre.
    level : float
        Target loss ``level_factor * L_0``.
    n_evaluations : int
        Number of loss evaluations used, summed over directions and sides.
    """

    left: Tensor
    right: Tensor
    flatness: Tensor
    censored: Tensor
    loss0: float
    level: float
    n_evaluations: int


def find_flatness(
    loss_along: LossAlong,
    n_directions: int,
    loss0: float,
    initial_step: Tensor | float,
    max_offset: float,
    level_factor: float = math.e,
    growth: float = 2.0,
    rtol: float = 1e-3,
    max_bisections: int = 40,
) -> FlatnessResult:
    """Locate the ``level_factor * L_0`` crossings on both sides of ``w_0``.

    Parameters
    ----------
    loss_along : callable
        ``loss_along(direction_index, offset)`` returns the losses at the requested
        points; both arguments and the result have shape (n_points,). All points of
        one bracketing step are requested in a single call, so a batched evaluator
        pays one call per step.
    n_directions : int
        Number of directions, indexed ``0 .. n_directions - 1``.
    loss0 : float
        Loss at the centre; must be positive and finite, because the level is a
        multiple of it.
    initial_step : float or Tensor of shape (n_directions,)
        First offset tried on each side, in weight units. A scale close to the
        expected crossing (for example the trajectory's standard deviation along the
        direction) saves evaluations.
    max_offset : float
        Largest offset searched on each side before the side is censored.
    level_factor : float
        The level is ``level_factor * loss0``; ``e`` in Feng and Tu's definition.
    growth : float
        Factor by which the step grows while no crossing is found.
    rtol : float
        Refinement stops when the bracket is narrower than ``rtol`` times its upper
        end, or when the loss at the newest point is within ``rtol (level - loss0)``
        of the level.
    max_bisections : int
        Upper bound on refinement steps per side.

    Returns
    -------
    FlatnessResult
    """
    if not math.isfinite(loss0) or loss0 <= 0:
        raise ValueError(
            f"loss0={loss0!r} is invalid: the flatness level is {level_factor:g} * L_0, "
            "so L_0 must be positive and finite. A training loss of exactly 0 has no "
            "flatness; evaluate the profiles on data where the model is not perfect."
        )
    if n_directions < 1:
        raise ValueError(f"n_directions={n_directions} must be at least 1")
    if growth <= 1.0:
        raise ValueError(f"growth={growth} must be greater than 1")
    if not (math.isfinite(max_offset) and max_offset > 0):
        raise ValueError(
            f"max_offset={max_offset} is invalid; it must be a finite positive offset, because "
            "a loss that never reaches the level is searched up to it"
        )
    if not (math.isfinite(level_factor) and level_factor > 1.0):
        raise ValueError(f"level_factor={level_factor} is invalid; it must be a finite number > 1")
    if not (math.isfinite(rtol) and rtol > 0):
        raise ValueError(f"rtol={rtol} is invalid; it must be a finite number > 0")

    level = level_factor * loss0
    step = torch.as_tensor(initial_step, dtype=torch.float64).expand(n_directions).clone()
    if not bool(torch.all(step > 0)) or not bool(torch.all(torch.isfinite(step))):
        raise ValueError(
            f"initial_step must be finite and positive for every direction, got {step.tolist()}"
        )
    step = step.clamp(max=max_offset)

    # One row per (direction, side): side 0 is theta < 0, side 1 is theta > 0.
    direction_index = torch.arange(n_directions).repeat_interleave(2)
    sign = torch.tensor([-1.0, 1.0], dtype=torch.float64).repeat(n_directions)
    below = torch.zeros(2 * n_directions, dtype=torch.float64)  # largest offset under the level
    above = step.repeat_interleave(2)  # candidate offset at or over the level
    loss_below = torch.full_like(below, float(loss0))
    loss_above = torch.full_like(below, math.inf)
    bracketed = torch.zeros(2 * n_directions, dtype=torch.bool)
    censored = torch.zeros(2 * n_directions, dtype=torch.bool)
    n_evaluations = 0

    def losses_at(rows: Tensor, magnitude: Tensor) -> Tensor:
        nonlocal n_evaluations
        n_evaluations += int(rows.numel())
        values = loss_along(direction_index[rows], sign[rows] * magnitude)
        values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        # A loss that overflows is far above the level.
        return torch.nan_to_num(values, nan=math.inf)

    # Bracketing: grow each side's step until the loss reaches the level.
    while True:
        active = torch.nonzero(~bracketed & ~censored).flatten()
        if active.numel() == 0:
            break
        values = losses_at(active, above[active])
        reached = values >= level
        bracketed[active[reached]] = True
        loss_above[active[reached]] = values[reached]
        missed = active[~reached]
        at_limit = above[missed] >= max_offset
        censored[missed[at_limit]] = True
        growing = missed[~at_limit]
        below[growing] = above[growing]
        loss_below[growing] = values[~reached][~at_limit]
        above[growing] = (above[growing] * growth).clamp(max=max_offset)

    # Refinement inside each bracket [below, above] by the Illinois variant of regula
    # falsi in the variable theta^2, where a quadratic profile is linear, so a nearly
    # quadratic profile converges in a few steps. Every third step bisects, which
    # bounds the work on profiles far from quadratic.
    for iteration in range(max_bisections):
        width = above - below
        active = torch.nonzero(bracketed & (width > rtol * above)).flatten()
        if active.numel() == 0:
            break
        lower, upper = below[active].pow(2), above[active].pow(2)
        gap_lower = loss_below[active] - level  # < 0
        gap_upper = loss_above[active] - level  # >= 0
        fraction = -gap_lower / (gap_upper - gap_lower)
        fraction = torch.nan_to_num(fraction, nan=0.5).clamp(0.05, 0.95)
        if iteration % 3 == 2:
            candidate = 0.5 * (below[active] + above[active])
        else:
            candidate = (lower + fraction * (upper - lower)).sqrt()
        values = losses_at(active, candidate)
        reached = values >= level
        hit, miss = active[reached], active[~reached]
        above[hit], loss_above[hit] = candidate[reached], values[reached]
        below[miss], loss_below[miss] = candidate[~reached], values[~reached]
        # Close the bracket once the loss at the new point is within rtol of the level.
        close = (values - level).abs() <= rtol * (level - float(loss0))
        below[active[close]] = candidate[close]
        above[active[close]] = candidate[close]

    # The crossing estimate is the bracket's midpoint.
    crossing = torch.where(bracketed, 0.5 * (below + above), torch.full_like(above, math.nan))
    crossing = crossing.reshape(n_directions, 2)
    left = -crossing[:, 0]
    right = crossing[:, 1]
    return FlatnessResult(
        left=left,
        right=right,
        flatness=right - left,
        censored=censored.reshape(n_directions, 2).any(dim=1),
        loss0=float(loss0),
        level=float(level),
        n_evaluations=n_evaluations,
    )


def curvature_from_flatness(flatness: Tensor, loss0: float, level_factor: float = math.e) -> Tensor:
    """Convert flatness into the curvature of the matching symmetric quadratic.

    A quadratic ``L_0 + h theta^2 / 2`` reaches ``level_factor * L_0`` at
    ``theta = +-F/2``, so ``h = 8 (level_factor - 1) L_0 / F^2``. This gives flatness a
    curvature scale in loss per squared weight unit.

    Parameters
    ----------
    flatness : Tensor of shape (n_directions,)
    loss0 : float
    level_factor : float

    Returns
    -------
    Tensor of shape (n_directions,)
        NaN where the flatness is NaN (a censored direction).
    """
    return 8.0 * (level_factor - 1.0) * loss0 / flatness.pow(2)
