"""Principal component analysis of a weight trajectory.

A trajectory is a matrix of snapshots ``w(t)`` of shape (n_snapshots, n_params).
Following Feng and Tu (PNAS 118, e2015617118, 2021), each snapshot is written as
``w(t) = <w>_T + sum_i theta_i(t) p_i`` where ``<w>_T`` is the time average over
the window and ``p_i`` are the principal directions of the centred snapshots.
The variance along ``p_i`` is the time average ``sigma_i^2 = <theta_i^2>_T``,
so it is normalised by ``n_snapshots``, not ``n_snapshots - 1``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

log = logging.getLogger(__name__)

PCAMethod = Literal["auto", "exact", "lowrank"]

# Above this many entries in the centred trajectory, "auto" switches to the randomized
# low-rank solver when only a few components are requested.
_LOWRANK_MIN_ENTRIES = 50_000_000


@dataclass(frozen=True)
class TrajectoryPCA:
    """Principal components of a trajectory, ranked by decreasing variance.

    Attributes
    ----------
    mean : Tensor of shape (n_params,)
        Time-averaged weights ``<w>_T``.
    directions : Tensor of shape (n_components, n_params)
        Orthonormal principal directions ``p_i`` as rows; the row of a component with
        zero variance is zero.
    variances : Tensor of shape (n_components,)
        Time-averaged squared projections ``sigma_i^2``, non-increasing.
    projections : Tensor of shape (n_snapshots, n_components)
        Coordinates ``theta_i(t)`` of the centred snapshots.
    total_variance : float
        Sum of the variances over all directions, kept or not.
    """

    mean: Tensor
    directions: Tensor
    variances: Tensor
    projections: Tensor
    total_variance: float

    @property
    def n_components(self) -> int:
        return int(self.variances.shape[0])


def trajectory_pca(
    snapshots: Tensor,
    n_components: int | None = None,
    method: PCAMethod = "auto",
    n_oversamples: int = 10,
    n_power_iterations: int = 4,
    precision: torch.dtype = torch.float64,
) -> TrajectoryPCA:
    """Compute the principal directions and variances of a trajectory.

    Parameters
    ----------
    snapshots : Tensor of shape (n_snapshots, n_params)
        Flattened weights, one row per snapshot.
    n_components : int, optional
        Number of leading components to keep. Defaults to the rank bound
        ``min(n_snapshots, n_params)``.
    method : {"auto", "exact", "lowrank"}
        "exact" diagonalises the smaller of the Gram matrix (n_snapshots squared) and
        the covariance (n_params squared), so it is exact and costs
        O(n_snapshots * n_params * min(n_snapshots, n_params)). "lowrank" uses the
        randomized SVD of Halko et al. (2011) and is meant for large trajectories
        where only a few components are needed. "auto" picks "lowrank" only when the
        trajectory is large and fewer than a tenth of the components are requested.
    n_oversamples, n_power_iterations : int
        Extra random vectors and subspace iterations of the randomized solver.
    precision : torch.dtype
        Floating type of the computation. Double precision (the default) keeps the
        small trailing variances meaningful; single precision is about twice as fast
        and enough when only the leading components are needed.

    Returns
    -------
    TrajectoryPCA
        Directions are sign-fixed so that each direction's largest-magnitude entry
        is positive, which makes results reproducible across solvers. Identical
        snapshots give zero variances and zero directions, with a logged warning.

    Raises
    ------
    ValueError
        If the shape or ``n_components`` is invalid, or a snapshot is not finite.
    """
    if snapshots.ndim != 2:
        raise ValueError(
            f"snapshots must have shape (n_snapshots, n_params), got {tuple(snapshots.shape)}"
        )
    n_snapshots, n_params = snapshots.shape
    if n_snapshots < 2:
        raise ValueError(
            f"PCA needs at least 2 snapshots, got {n_snapshots}; record more snapshots "
            "or lengthen the snapshot window"
        )
    rank_bound = min(n_snapshots, n_params)
    if n_components is None:
        n_components = rank_bound
    if not 1 <= n_components <= rank_bound:
        raise ValueError(
            f"n_components={n_components} is out of range: it must be between 1 and "
            f"min(n_snapshots, n_params) = {rank_bound}"
        )
    if method not in ("auto", "exact", "lowrank"):
        raise ValueError(f"method={method!r} is invalid; use 'auto', 'exact' or 'lowrank'")
    finite_rows = torch.isfinite(snapshots).all(dim=1)
    if not bool(finite_rows.all()):
        first = int(torch.nonzero(~finite_rows)[0])
        raise ValueError(
            f"snapshots contain NaN or infinite weights (first in snapshot {first} of "
            f"{n_snapshots}), so the trajectory diverged; lower the learning rate"
        )

    if precision not in (torch.float32, torch.float64):
        raise ValueError(f"precision={precision} is invalid; use torch.float32 or torch.float64")
    work = snapshots.detach().to(precision)
    mean = work.mean(dim=0)
    centred = work - mean
    identical = bool((work == work[0]).all())
    if identical:
        # The rounded mean can differ from the snapshots in the last bit.
        centred = torch.zeros_like(work)
    total_variance = float(centred.pow(2).sum() / n_snapshots)

    if method == "auto":
        large = n_snapshots * n_params > _LOWRANK_MIN_ENTRIES
        method = "lowrank" if large and n_components * 10 < rank_bound else "exact"

    if method == "exact":
        directions, singular_values = _exact_components(centred, n_components)
    else:
        rank = min(n_components + n_oversamples, rank_bound)
        _, singular_values, v = torch.svd_lowrank(centred, q=rank, niter=n_power_iterations)
        directions = v[:, :n_components].T
        singular_values = singular_values[:n_components]

    # A component of zero variance has no defined direction, and the solvers return
    # different arbitrary vectors for it, so its row is set to zero.
    directions = torch.where(singular_values[:, None] > 0, directions, torch.zeros_like(directions))
    directions = _fix_signs(directions)
    variances = singular_values.pow(2) / n_snapshots
    if identical:
        log.warning(
            "all %d snapshots are identical, so every variance is 0 and every direction is "
            "a zero vector; the weights did not move over the window",
            n_snapshots,
        )
    projections = centred @ directions.T

    dtype = snapshots.dtype if snapshots.is_floating_point() else torch.float32
    return TrajectoryPCA(
        mean=mean.to(dtype),
        directions=directions.to(dtype),
        variances=variances.to(dtype),
        projections=projections.to(dtype),
        total_variance=total_variance,
    )


def remove_linear_drift(snapshots: Tensor) -> Tensor:
    """Subtract from every coordinate its least-squares straight line in snapshot order.

    A trajectory that drifts steadily (Feng and Tu's ``theta_1``) puts its largest
    principal component along the drift. After this subtraction, the principal
    directions describe the fluctuations around the drift. Snapshots are assumed evenly spaced in time.
    Returns a tensor of the same shape and type, with zero mean over the snapshots.
    """
    if snapshots.ndim != 2 or snapshots.shape[0] < 3:
        raise ValueError(
            f"removing a linear drift needs snapshots of shape (n_snapshots >= 3, n_params), "
            f"got {tuple(snapshots.shape)}"
        )
    times = torch.arange(snapshots.shape[0], dtype=snapshots.dtype, device=snapshots.device)
    times = times - times.mean()
    centred = snapshots - snapshots.mean(dim=0)
    slopes = (times @ centred) / times.pow(2).sum()
    return centred - times[:, None] * slopes[None, :]


def _exact_components(centred: Tensor, n_components: int) -> tuple[Tensor, Tensor]:
    """Return the top directions (rows) and singular values of a centred matrix."""
    n_snapshots, n_params = centred.shape
    if n_snapshots <= n_params:
        # Gram trick: the eigenvectors u of X X^T give p = X^T u / s.
        gram = centred @ centred.T
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        order = torch.argsort(eigenvalues, descending=True)[:n_components]
        singular_values = eigenvalues[order].clamp_min(0.0).sqrt()
        u = eigenvectors[:, order]
        directions = (centred.T @ u).T
        # A direction of zero variance has no defined p, so its row stays zero.
        norms = directions.norm(dim=1, keepdim=True)
        directions = torch.where(norms > 0, directions / norms.clamp_min(1e-300), directions)
        return directions, singular_values

    covariance = centred.T @ centred
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    order = torch.argsort(eigenvalues, descending=True)[:n_components]
    return eigenvectors[:, order].T, eigenvalues[order].clamp_min(0.0).sqrt()


def _fix_signs(directions: Tensor) -> Tensor:
    """Flip each row so that its largest-magnitude entry is positive."""
    index = directions.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(directions.gather(1, index))
    signs[signs == 0] = 1.0
    return directions * signs
