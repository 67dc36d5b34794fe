"""Hessian curvature of the training loss along principal directions.

The curvature along a unit direction ``p`` is the quadratic form ``p^T H p`` of the
Hessian ``H`` of the loss at ``w_0``. It is computed from Hessian-vector products,
forward-mode differentiation of the gradient (``torch.func.jvp`` over
``torch.func.grad``), so the Hessian is never formed. A quadratic profile
``L_0 + h theta^2 / 2`` crosses ``e L_0`` at ``theta = +-F/2`` with
``h = 8 (e - 1) L_0 / F^2`` (see :func:`vsfcl.flatness.curvature_from_flatness`), so
curvature falls as ``F^-2`` where the profiles are quadratic. The comparison below
tests that scaling on the measured landscape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.func import grad, jvp, vmap


def hessian_quadratic_forms(
    loss_terms: Sequence[Callable[[Tensor], Tensor]],
    center: Tensor,
    directions: Tensor,
    batch_size: int = 16,
) -> Tensor:
    """Compute ``p_i^T H p_i`` for each row ``p_i`` of ``directions``.

    Parameters
    ----------
    loss_terms : sequence of callables
        Functions of a parameter vector of shape (n_params,) that return a scalar. The
        loss is their sum (for example one term per data chunk), so the Hessian is the
        sum of theirs, and memory stays bounded by what one term needs.
    center : Tensor of shape (n_params,)
        Point ``w_0`` at which the Hessian is taken.
    directions : Tensor of shape (n_directions, n_params)
    batch_size : int
        Directions processed together under ``vmap``.

    Returns
    -------
    Tensor of shape (n_directions,), float64, on the CPU
        In loss units per squared weight unit, for unit-norm directions.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    center = center.detach()
    directions = directions.detach().to(center.device, center.dtype)
    forms = torch.zeros(directions.shape[0], dtype=torch.float64)
    for term in loss_terms:
        gradient = grad(term)

        def hvp(tangent: Tensor, gradient: Callable[[Tensor], Tensor] = gradient) -> Tensor:
            return jvp(gradient, (center,), (tangent,))[1]

        batched_hvp = vmap(hvp)
        for start in range(0, directions.shape[0], batch_size):
            block = directions[start : start + batch_size]
            products = batched_hvp(block).detach()
            forms[start : start + block.shape[0]] += (
                (block.double() * products.double()).sum(dim=1).cpu()
            )
    return forms


@dataclass(frozen=True)
class CurvatureFlatnessComparison:
    """Log-log comparison of Hessian curvature with flatness.

    Attributes
    ----------
    slope : float
        Least-squares slope of ``log(p^T H p)`` on ``log F``; -2 when the profiles are
        quadratic with curvature ``~ 1 / F^2``.
    pearson_r : float
        Pearson correlation of the two logarithms.
    n_used : int
        Directions with a finite flatness and a positive curvature.
    n_nonpositive : int
        Directions whose curvature is zero or negative (not a local minimum along
        ``p``), left out because their logarithm is undefined.
    """

    slope: float
    pearson_r: float
    n_used: int
    n_nonpositive: int


def compare_curvature_with_flatness(
    curvature: Tensor, flatness: Tensor
) -> CurvatureFlatnessComparison:
    """Fit ``log(p_i^T H p_i)`` against ``log F_i`` over directions where both are defined.

    The slope and correlation are NaN when fewer than 3 directions qualify or their
    flatness has no spread.
    """
    h = curvature.detach().to("cpu", torch.float64).numpy()
    f = flatness.detach().to("cpu", torch.float64).numpy()
    finite = np.isfinite(f) & (f > 0)
    positive = h > 0
    used = finite & positive
    n_used = int(used.sum())
    slope = pearson_r = math.nan
    if n_used >= 3:
        x = np.log(f[used])
        y = np.log(h[used])
        if np.ptp(x) > 0:
            slope = float(np.polyfit(x, y, 1)[0])
            pearson_r = float(np.corrcoef(x, y)[0, 1])
    return CurvatureFlatnessComparison(
        slope=slope,
        pearson_r=pearson_r,
        n_used=n_used,
        n_nonpositive=int((finite & ~positive).sum()),
    )
