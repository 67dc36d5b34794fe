r"""The flatness-aware quadratic penalty on the sharp directions of past experiences.

Derivation
----------
Feng and Tu (PNAS 118, e2015617118, 2021) show that along the principal directions
``p_i`` of an SGD trajectory in the exploration phase, the variance and the flatness
obey ``sigma_i^2 \propto F_i^{-psi}`` with ``psi ~ 4``: the few directions where SGD
fluctuates most are the sharpest. Around the solution ``w*`` of an old experience, a
quadratic model of that experience's loss that reaches ``e L_0`` at ``theta = +-F_i/2``
along ``p_i`` is

.. math:: L(w) \approx L_0 + \tfrac12 \sum_i k_i \, (p_i \cdot (w - w^*))^2,
          \qquad k_i = 8 (e - 1) L_0 / F_i^2 ,

so keeping the old loss low only requires holding ``w`` near ``w*`` along the sharp
directions, where ``k_i`` is large. The many flat directions, where ``k_i`` is small,
are left free for new experiences. The penalty added while training later experiences
is

.. math:: \Omega(w) = \frac{\lambda}{2} \sum_{e} \sum_{i \le K} k_{e,i}
          \, (p_{e,i} \cdot (w - w_e^*))^2 ,

summed over the past experiences ``e``. The stiffness ``k_{e,i}`` comes from one of:

- ``"flatness"``: the measured flatness, ``k_i = 8 (e - 1) L_0 / F_i^2`` (loss per
  squared weight unit), so ``lambda = 1`` is the quadratic model itself;
- ``"variance"``: the variance alone through ``sigma^2 \propto F^{-psi}``, which needs
  no loss profile. Then ``F_i \propto sigma_i^{-2/psi}`` and ``k_i \propto F_i^{-2}
  \propto sigma_i^{4/psi}``. We fix the unknown scale with the first direction,
  ``k_i = (sigma_i^2 / sigma_1^2)^{2/psi} / sigma_1^2``, so that the penalty counts
  displacements along ``p_1`` in units of the old trajectory's own standard deviation;
- ``"hessian"``: the curvature ``p_i^T H p_i`` from Hessian-vector products, an ablation.

The last two are choices of this package, not of the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SharpSubspace:
    """The sharp directions of one past experience and their stiffness.

    Attributes
    ----------
    anchor : Tensor of shape (n_params,)
        Weights ``w*`` at the end of training on the experience.
    directions : Tensor of shape (n_directions, n_params)
        Orthonormal principal directions ``p_i`` as rows.
    stiffness : Tensor of shape (n_directions,)
        Non-negative ``k_i`` per direction.
    experience : int
        Index of the experience in the stream.
    """

    anchor: Tensor
    directions: Tensor
    stiffness: Tensor
    experience: int

    def __post_init__(self) -> None:
        n_directions, n_params = self.directions.shape
        if self.anchor.shape != (n_params,):
            raise ValueError(
                f"anchor has shape {tuple(self.anchor.shape)}, expected ({n_params},) "
                "to match the directions"
            )
        if self.stiffness.shape != (n_directions,):
            raise ValueError(
                f"stiffness has shape {tuple(self.stiffness.shape)}, expected ({n_directions},)"
            )
        if not bool(torch.all(torch.isfinite(self.stiffness))) or bool(
            torch.any(self.stiffness < 0)
        ):
            raise ValueError(
                f"stiffness of experience {self.experience} must be finite and non-negative, "
                f"got {self.stiffness.tolist()}"
            )


class SubspacePenalty:
    """Sum of quadratic penalties ``(1/2) sum_i k_i (p_i . (w - w*))^2`` over subspaces.

    All subspaces are stacked into one matrix, so evaluating the penalty costs one
    (n_rows, n_params) matrix-vector product, with ``n_rows`` the total number of
    kept directions, and its gradient one more.

    Parameters
    ----------
    max_rows : int, optional
        Cap on ``n_rows``. ``None`` stacks every subspace as it is, so the cost per
        step grows with the number of past experiences. With a cap, each new subspace
        is merged with the stored ones into a single quadratic form (the sum of all of
        them, which has one combined anchor), and only the ``max_rows`` stiffest
        eigendirections of that form are kept. While the summed rank stays within the
        cap, the merged penalty equals the stacked one up to a constant.
    """

    def __init__(self, max_rows: int | None = None) -> None:
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows={max_rows} must be at least 1, or None for no cap")
        self.max_rows = max_rows
        self.subspaces: list[SharpSubspace] = []
        self._directions: Tensor | None = None  # (n_rows, n_params)
        self._targets: Tensor | None = None  # (n_rows,), p_i . w*
        self._stiffness: Tensor | None = None  # (n_rows,)
        self._blocks: list[Tensor] = []  # column blocks of _directions, one per parameter
        self._block_sizes: list[int] = []

    def __len__(self) -> int:
        return len(self.subspaces)

    @property
    def n_rows(self) -> int:
        return 0 if self._directions is None else int(self._directions.shape[0])

    def add(self, subspace: SharpSubspace) -> None:
        """Add a past experience's subspace to the penalty, merging it when capped."""
        if (
            self._directions is not None
            and subspace.directions.shape[1] != self._directions.shape[1]
        ):
            raise ValueError(
                f"subspace has {subspace.directions.shape[1]} parameters but earlier ones have "
                f"{self._directions.shape[1]}; the regularized parameter set must not change"
            )
        if self.max_rows is None:
            self.subspaces.append(subspace)
        else:
            self.subspaces = [merge_subspaces([*self.subspaces, subspace], self.max_rows)]
        self._rebuild()

    def replace_all(self, subspaces: list[SharpSubspace]) -> None:
        """Replace the stored subspaces, for example when restoring a checkpoint."""
        self.subspaces = []
        self._directions = self._targets = self._stiffness = None
        self._blocks, self._block_sizes = [], []
        if self.max_rows is not None and len(subspaces) > 1:
            subspaces = [merge_subspaces(subspaces, self.max_rows)]
        for subspace in subspaces:
            self.subspaces.append(subspace)
            self._rebuild()

    def _rebuild(self) -> None:
        self._directions = torch.cat([s.directions for s in self.subspaces])
        self._targets = torch.cat([s.directions @ s.anchor for s in self.subspaces])
        self._stiffness = torch.cat([s.stiffness for s in self.subspaces])
        self._blocks, self._block_sizes = [], []

    def to(self, device: torch.device | str) -> SubspacePenalty:
        if self._directions is not None:
            self._directions = self._directions.to(device)
            self._targets = self._targets.to(device)  # type: ignore[union-attr]
            self._stiffness = self._stiffness.to(device)  # type: ignore[union-attr]
            self._blocks, self._block_sizes = [], []
        return self

    def __call__(self, weights: Tensor) -> Tensor:
        """Evaluate the penalty (without ``lambda``) at flattened weights of shape (n_params,)."""
        directions, targets, stiffness = self._directions, self._targets, self._stiffness
        if directions is None or targets is None or stiffness is None:
            return weights.new_zeros(())
        displacement = directions @ weights - targets  # (n_rows,)
        return 0.5 * torch.sum(stiffness * displacement.pow(2))

    def gradient(self, weights: Tensor) -> Tensor:
        """Analytic gradient ``sum_i k_i (p_i . (w - w*)) p_i`` of shape (n_params,)."""
        directions, targets, stiffness = self._directions, self._targets, self._stiffness
        if directions is None or targets is None or stiffness is None:
            return torch.zeros_like(weights)
        displacement = directions @ weights - targets
        return (stiffness * displacement) @ directions

    # The two methods below work on the parameter tensors themselves. Training calls
    # them instead of flattening the weights and differentiating the penalty: a
    # concatenation and an autograd graph per step cost more than the products.

    @torch.no_grad()
    def displacement(self, parameters: Sequence[Tensor]) -> Tensor:
        """Return ``p_i . w - p_i . w*`` of shape (n_rows,) from the parameter tensors."""
        if self._directions is None:
            raise RuntimeError("the penalty contains no subspace yet; call add() first")
        return self._displacement_of_rows(parameters, slice(None))

    def _displacement_of_rows(self, parameters: Sequence[Tensor], rows: slice) -> Tensor:
        assert self._targets is not None
        displacement = self._targets[rows].neg()
        for block, parameter in zip(self._column_blocks(parameters), parameters, strict=True):
            displacement.addmv_(block[rows], parameter.reshape(-1))
        return displacement

    def value(self, displacement: Tensor) -> Tensor:
        """Return the penalty (without ``lambda``) for a :meth:`displacement`."""
        assert self._stiffness is not None
        return 0.5 * torch.sum(self._stiffness * displacement.pow(2))

    @torch.no_grad()
    def accumulate_gradient(
        self, parameters: Sequence[Tensor], displacement: Tensor, scale: float
    ) -> None:
        """Add ``scale`` times the penalty's gradient to each parameter's ``.grad``."""
        assert self._stiffness is not None
        coefficients = scale * self._stiffness * displacement
        for block, parameter in zip(self._column_blocks(parameters), parameters, strict=True):
            step = (coefficients @ block).view_as(parameter)
            if parameter.grad is None:
                parameter.grad = step.clone()
            else:
                parameter.grad.add_(step)

    @torch.no_grad()
    def proximal_step(self, parameters: Sequence[Tensor], step_size: float) -> Tensor:
        """Move the parameters in place by one proximal step of the penalty; return it before.

        For one subspace, the step minimizes ``penalty(w) + |w - w_0|^2 / (2 step_size)``
        around the current weights ``w_0``: along each kept direction the displacement
        shrinks by the factor ``1 / (1 + step_size * k_i)``, and nothing else moves.
        Subspaces are stepped one after the other, each from where the previous one
        left the weights, so that nearly parallel directions of different experiences
        cannot add up to an overshoot. Returns the displacement before the step, shape
        (n_rows,).
        """
        assert self._stiffness is not None
        blocks = self._column_blocks(parameters)
        before = []
        start = 0
        for subspace in self.subspaces:
            rows = slice(start, start + subspace.directions.shape[0])
            start = rows.stop
            displacement = self._displacement_of_rows(parameters, rows)
            rate = step_size * self._stiffness[rows]
            coefficients = -(rate / (1.0 + rate)) * displacement
            for block, parameter in zip(blocks, parameters, strict=True):
                parameter.add_((coefficients @ block[rows]).view_as(parameter))
            before.append(displacement)
        return torch.cat(before)

    def _column_blocks(self, parameters: Sequence[Tensor]) -> list[Tensor]:
        sizes = [p.numel() for p in parameters]
        if sizes != self._block_sizes:
            assert self._directions is not None
            if sum(sizes) != self._directions.shape[1]:
                raise ValueError(
                    f"the parameters contain {sum(sizes)} values but the penalty was built for "
                    f"{self._directions.shape[1]}; the regularized parameter set must not change"
                )
            self._blocks = [b.contiguous() for b in self._directions.split(sizes, dim=1)]
            self._block_sizes = sizes
        return self._blocks


def merge_subspaces(subspaces: Sequence[SharpSubspace], max_rows: int) -> SharpSubspace:
    """Sum the penalties of several subspaces into one and keep its stiffest directions.

    The sum ``(1/2) sum_e sum_i k_{e,i} (p_{e,i} . (w - w_e*))^2`` is the quadratic form
    ``(1/2) (w - a)^T A (w - a)`` plus a constant, with ``A = sum k p p^T`` of rank at
    most the total number of rows. Its eigendirections, found in the span of all rows,
    become the merged subspace's directions, the eigenvalues its stiffness, and ``a``
    (the minimum-norm solution of ``A a = sum k p (p . w*)``) its anchor. Only the
    ``max_rows`` largest eigenvalues are kept, so this is exact up to a constant while
    the rank of ``A`` is at most ``max_rows``.

    The work is done in double precision and costs O(n_params * n_rows^2).
    """
    if not subspaces:
        raise ValueError("merge_subspaces needs at least one subspace")
    if max_rows < 1:
        raise ValueError(f"max_rows={max_rows} must be at least 1")
    dtype = subspaces[-1].directions.dtype
    rows = torch.cat([s.directions for s in subspaces]).to(torch.float64)  # (n_rows, n_params)
    weights = torch.cat([s.stiffness for s in subspaces]).to(torch.float64)
    targets = torch.cat([s.directions @ s.anchor for s in subspaces]).to(torch.float64)
    # rows^T = Q R, so A = Q (R diag(k) R^T) Q^T and the linear term is Q R (k * targets).
    basis, triangle = torch.linalg.qr(rows.T)
    small = triangle @ (weights[:, None] * triangle.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (small + small.T))
    order = torch.argsort(eigenvalues, descending=True)
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    # Directions whose eigenvalue is rounding noise carry no penalty, so they are dropped.
    tolerance = eigenvalues[0].clamp_min(0.0) * rows.shape[0] * torch.finfo(torch.float64).eps
    keep = min(max_rows, int((eigenvalues > tolerance).sum()))
    keep = max(keep, 1)
    eigenvalues, eigenvectors = eigenvalues[:keep].clamp_min(0.0), eigenvectors[:, :keep]
    directions = (basis @ eigenvectors).T  # (keep, n_params), orthonormal rows
    linear = eigenvectors.T @ (triangle @ (weights * targets))
    coordinates = torch.where(
        eigenvalues > 0, linear / eigenvalues.clamp_min(torch.finfo(torch.float64).tiny), 0.0
    )
    anchor = coordinates @ directions
    return SharpSubspace(
        anchor=anchor.to(dtype),
        directions=directions.to(dtype),
        stiffness=eigenvalues.to(dtype),
        experience=max(s.experience for s in subspaces),
    )


def stiffness_from_variance(variances: Tensor, psi: float = 4.0) -> Tensor:
    """Stiffness from the variances alone through ``sigma^2 ~ F^{-psi}``.

    Returns ``k_i = (sigma_i^2 / sigma_1^2)^{2/psi} / sigma_1^2``, where ``sigma_1^2``
    is the largest variance. Shape (n_directions,).
    """
    if psi <= 0:
        raise ValueError(f"psi={psi} must be positive; Feng and Tu measured psi close to 4")
    top = variances.max()
    if not bool(top > 0):
        raise ValueError(
            "all trajectory variances are zero: the snapshots are identical, so there is "
            "no sharp direction to protect; lengthen the snapshot window or check the "
            "learning rate"
        )
    relative = (variances / top).clamp_min(0.0)
    return relative.pow(2.0 / psi) / top
