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
    kept directions.
    """

    def __init__(self) -> None:
        self.subspaces: list[SharpSubspace] = []
        self._directions: Tensor | None = None  # (n_rows, n_params)
        self._targets: Tensor | None = None  # (n_rows,), p_i . w*
        self._stiffness: Tensor | None = None  # (n_rows,)

    def __len__(self) -> int:
        return len(self.subspaces)

    @property
    def n_rows(self) -> int:
        return 0 if self._directions is None else int(self._directions.shape[0])

    def add(self, subspace: SharpSubspace) -> None:
        """Append a past experience's subspace to the penalty."""
        if (
            self._directions is not None
            and subspace.directions.shape[1] != self._directions.shape[1]
        ):
            raise ValueError(
                f"subspace has {subspace.directions.shape[1]} parameters but earlier ones have "
                f"{self._directions.shape[1]}; the regularized parameter set must not change"
            )
        self.subspaces.append(subspace)
        self._rebuild()

    def replace_all(self, subspaces: list[SharpSubspace]) -> None:
        """Replace the stored subspaces, for example when restoring a checkpoint."""
        self.subspaces = []
        self._directions = self._targets = self._stiffness = None
        for subspace in subspaces:
            self.add(subspace)

    def _rebuild(self) -> None:
        self._directions = torch.cat([s.directions for s in self.subspaces])
        self._targets = torch.cat([s.directions @ s.anchor for s in self.subspaces])
        self._stiffness = torch.cat([s.stiffness for s in self.subspaces])

    def to(self, device: torch.device | str) -> SubspacePenalty:
        if self._directions is not None:
            self._directions = self._directions.to(device)
            self._targets = self._targets.to(device)  # type: ignore[union-attr]
            self._stiffness = self._stiffness.to(device)  # type: ignore[union-attr]
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
