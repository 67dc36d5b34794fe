"""The ensemble of minibatch losses around ``w_0``.

SGD descends the minibatch loss ``L^mu = L + delta L^mu`` of a random minibatch ``mu``
of ``B`` training samples, not the full training loss ``L``. Along a unit direction
``p_i`` this module measures two things of that ensemble (Feng and Tu, PNAS 118,
e2015617118, 2021, random-landscape theory):

* the directional derivatives ``g^mu . p_i`` of the minibatch losses and ``g . p_i`` of
  the full-batch loss at ``w_0``, from which the effective temperature
  ``T_i = (alpha / 2) <(g^mu . p_i - g . p_i)^2>_mu`` follows; ``<.>_mu`` is the plain
  mean over the sampled minibatches;
* the minibatch loss profiles ``L^mu_i(theta) = L^mu(w_0 + theta p_i)`` on a small grid
  of offsets, each fitted by a quadratic ``a + b theta + c theta^2`` whose minimum
  ``-b / (2c)`` and curvature ``2c`` describe where that minibatch's valley lies and
  how sharp it is.

Minibatches are drawn as SGD draws them: consecutive blocks of ``B`` indices of random
permutations of the training set, so no sample repeats within a permutation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from vsfcl.landscape.profiles import ProfileEvaluator
from vsfcl.landscape.trajectory import unflatten_parameters


@dataclass(frozen=True)
class DirectionalDerivatives:
    """Derivatives of the minibatch and full-batch losses along each direction at ``w_0``.

    Attributes
    ----------
    minibatch : Tensor of shape (n_minibatches, n_directions), float64
        ``g^mu . p_i``, in loss units per weight unit.
    full_batch : Tensor of shape (n_directions,), float64
        ``g . p_i`` of the mean loss over every training sample given.
    """

    minibatch: Tensor
    full_batch: Tensor


@dataclass(frozen=True)
class MinibatchMinima:
    """Quadratic fits of the minibatch loss profiles, per minibatch and direction.

    Attributes
    ----------
    minimum_offset : ndarray of shape (n_minibatches, n_directions)
        ``-b / (2c)``, the offset of the fitted minimum from ``w_0`` in weight units;
        NaN where ``c <= 0`` (no minimum) or the direction has no grid.
    curvature : ndarray of shape (n_minibatches, n_directions)
        ``2c``, in loss units per squared weight unit.
    slope : ndarray of shape (n_minibatches, n_directions)
        ``b``, the fitted derivative at ``w_0``.
    half_width : ndarray of shape (n_directions,)
        Largest absolute offset of each direction's grid.
    """

    minimum_offset: np.ndarray
    curvature: np.ndarray
    slope: np.ndarray
    half_width: np.ndarray

    @property
    def n_minima(self) -> np.ndarray:
        """Count of minibatches whose fitted quadratic has a minimum, shape (n_directions,)."""
        return np.isfinite(self.minimum_offset).sum(axis=0)

    @property
    def n_outside_grid(self) -> np.ndarray:
        """Count of minibatches whose fitted minimum lies beyond the grid, shape (n_directions,)."""
        with np.errstate(invalid="ignore"):
            return (np.abs(self.minimum_offset) > self.half_width).sum(axis=0)

    def statistics(self) -> dict[str, np.ndarray]:
        """Return the mean and standard deviation over minibatches, each of shape (n_directions,).

        The standard deviation divides by the number of minibatches (``ddof=0``), the
        same ensemble average as the effective temperature. Minibatches without a
        minimum are left out of the offset statistics but kept in the curvature
        statistics, where a non-positive ``2c`` is a valid value. A direction with no
        value gets NaN.
        """
        return {
            "minimum_offset_mean": _nan_statistic(np.nanmean, self.minimum_offset),
            "minimum_offset_std": _nan_statistic(np.nanstd, self.minimum_offset),
            "curvature_mean": _nan_statistic(np.nanmean, self.curvature),
            "curvature_std": _nan_statistic(np.nanstd, self.curvature),
        }


def draw_minibatches(
    n_samples: int, batch_size: int, n_minibatches: int, generator: torch.Generator
) -> Tensor:
    """Draw minibatch index sets the way an epoch of SGD does.

    Returns
    -------
    Tensor of shape (n_minibatches, batch_size), int64
        Row ``mu`` contains the sample indices of minibatch ``mu``. Each permutation of
        the ``n_samples`` indices yields ``n_samples // batch_size`` minibatches; more
        permutations are drawn as needed.
    """
    if not 1 <= batch_size <= n_samples:
        raise ValueError(f"batch_size={batch_size} must be between 1 and the {n_samples} samples")
    if n_minibatches < 1:
        raise ValueError(f"n_minibatches={n_minibatches} must be at least 1")
    per_permutation = n_samples // batch_size
    blocks: list[Tensor] = []
    while len(blocks) * per_permutation < n_minibatches:
        order = torch.randperm(n_samples, generator=generator)
        blocks.append(order[: per_permutation * batch_size].view(per_permutation, batch_size))
    return torch.cat(blocks)[:n_minibatches]


def directional_derivatives(
    model: nn.Module,
    parameter_names: Sequence[str],
    center: Tensor,
    directions: Tensor,
    inputs: Tensor,
    targets: Tensor,
    minibatch_indices: Tensor,
    chunk_size: int = 8192,
) -> DirectionalDerivatives:
    """Compute ``g^mu . p_i`` for each minibatch and ``g . p_i`` for the full batch at ``w_0``.

    The loss is the mean cross-entropy, as in training. Only the analysed parameters
    are moved to ``center``; every other parameter keeps its value in ``model``.

    Parameters
    ----------
    model : nn.Module
        Network without batch-dependent layers (no batch normalisation), because the
        per-minibatch gradients are vectorised with ``torch.func.vmap``.
    parameter_names : sequence of str
        Analysed parameters, in the order of the flattened vectors.
    center : Tensor of shape (n_params,)
        ``w_0`` for the analysed parameters.
    directions : Tensor of shape (n_directions, n_params)
        Unit directions ``p_i`` as rows.
    inputs : Tensor of shape (n_samples, ...)
    targets : Tensor of shape (n_samples,), int64
        The training set; the full-batch derivative averages over all of it.
    minibatch_indices : Tensor of shape (n_minibatches, batch_size), int64
        Sample indices of each minibatch (see :func:`draw_minibatches`).
    chunk_size : int
        Samples per chunk of the full-batch gradient, and the most samples in one
        vectorised pass over minibatches.

    Returns
    -------
    DirectionalDerivatives
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be at least 1")
    if minibatch_indices.ndim != 2:
        raise ValueError(
            f"minibatch_indices must have shape (n_minibatches, batch_size), got "
            f"{tuple(minibatch_indices.shape)}"
        )
    device = inputs.device
    model = model.eval()
    flat = center.detach().to(device, torch.float32)

    def mean_loss(weights: Tensor, x: Tensor, y: Tensor) -> Tensor:
        parameters = unflatten_parameters(model, parameter_names, weights)
        return F.cross_entropy(functional_call(model, parameters, (x,)), y)

    # torch.func.grad differentiates with respect to ``flat`` even under no_grad, which
    # keeps the model's own parameters from recording a graph.
    with torch.no_grad():
        # Full-batch gradient: sum over chunks of each chunk's mean times its share of samples.
        n_samples = inputs.shape[0]
        full_gradient = torch.zeros_like(flat, dtype=torch.float64)
        for start in range(0, n_samples, chunk_size):
            x = inputs[start : start + chunk_size]
            y = targets[start : start + chunk_size]
            full_gradient += grad(mean_loss)(flat, x, y).double() * (x.shape[0] / n_samples)

        # One gradient per minibatch, vectorised over groups of minibatches.
        n_minibatches, batch_size = minibatch_indices.shape
        group = max(1, chunk_size // batch_size)
        batched_gradient = vmap(grad(mean_loss), in_dims=(None, 0, 0))
        gradients = []
        for begin in range(0, n_minibatches, group):
            index = minibatch_indices[begin : begin + group].to(device)
            gradients.append(batched_gradient(flat, inputs[index], targets[index]).double())
        minibatch_gradients = torch.cat(gradients)

    unit = directions.detach().to(device, torch.float64)
    return DirectionalDerivatives(
        minibatch=(minibatch_gradients @ unit.T).cpu(),
        full_batch=(full_gradient @ unit.T).cpu(),
    )


def effective_temperature(
    minibatch_derivatives: Tensor | np.ndarray,
    full_batch_derivatives: Tensor | np.ndarray,
    learning_rate: float,
) -> np.ndarray:
    """Compute ``T_i = (alpha / 2) <(g^mu . p_i - g . p_i)^2>_mu``.

    Parameters
    ----------
    minibatch_derivatives : array of shape (n_minibatches, n_directions)
        ``g^mu . p_i``, in loss units per weight unit.
    full_batch_derivatives : array of shape (n_directions,)
        ``g . p_i`` of the full training loss. It is subtracted as given, not replaced
        by the minibatch mean, so ``T_i`` also contains any bias of the sampled mean.
    learning_rate : float
        ``alpha``, per step.

    Returns
    -------
    ndarray of shape (n_directions,)
        In loss units: with ``theta`` in weight units, the step noise along ``p_i`` has
        variance ``2 alpha T_i`` in squared weight units.
    """
    minibatch = _as_float64(minibatch_derivatives)
    full = _as_float64(full_batch_derivatives)
    if minibatch.ndim != 2 or full.shape != (minibatch.shape[1],):
        raise ValueError(
            f"minibatch derivatives {minibatch.shape} and full-batch derivatives {full.shape} "
            "must have shapes (n_minibatches, n_directions) and (n_directions,)"
        )
    if not learning_rate > 0:
        raise ValueError(f"learning_rate={learning_rate} must be positive")
    return 0.5 * learning_rate * np.mean((minibatch - full) ** 2, axis=0)


def offset_grid(half_width: Tensor | np.ndarray, n_offsets: int) -> np.ndarray:
    """Build a symmetric grid of offsets per direction.

    Parameters
    ----------
    half_width : array of shape (n_directions,)
        Largest offset on each side, in weight units; NaN gives a row of NaN.
    n_offsets : int
        Points per direction, at least 3 for a quadratic fit.

    Returns
    -------
    ndarray of shape (n_directions, n_offsets)
    """
    if n_offsets < 3:
        raise ValueError(f"n_offsets={n_offsets} must be at least 3 to fit a quadratic")
    width = _as_float64(half_width)
    return width[:, None] * np.linspace(-1.0, 1.0, n_offsets)[None, :]


def minibatch_profiles(
    model: nn.Module,
    parameter_names: Sequence[str],
    center: Tensor,
    directions: Tensor,
    inputs: Tensor,
    targets: Tensor,
    minibatch_indices: Tensor,
    offsets: np.ndarray,
    max_batch: int = 256,
) -> np.ndarray:
    """Evaluate ``L^mu_i(theta)`` for every minibatch, direction and offset.

    Each minibatch gets its own :class:`~vsfcl.landscape.profiles.ProfileEvaluator`,
    so the cached activations and the linear-layer shortcut apply to it.

    Parameters
    ----------
    offsets : ndarray of shape (n_directions, n_offsets)
        Offsets in weight units (see :func:`offset_grid`). A direction whose row
        contains NaN is not evaluated and gets NaN losses.
    max_batch : int
        Points per vectorised pass of the evaluator.

    Other parameters are as in :func:`directional_derivatives`.

    Returns
    -------
    ndarray of shape (n_minibatches, n_directions, n_offsets)
        Mean cross-entropy of each minibatch.
    """
    offsets = _as_float64(offsets)
    n_directions, n_offsets = offsets.shape
    if directions.shape[0] != n_directions:
        raise ValueError(
            f"offsets has {n_directions} rows but there are {directions.shape[0]} directions"
        )
    defined = np.nonzero(np.all(np.isfinite(offsets), axis=1))[0]
    n_minibatches = minibatch_indices.shape[0]
    losses = np.full((n_minibatches, n_directions, n_offsets), np.nan)
    if defined.size == 0:
        return losses
    direction_index = torch.as_tensor(np.repeat(defined, n_offsets))
    point_offsets = torch.as_tensor(offsets[defined].reshape(-1))
    for mu, index in enumerate(minibatch_indices.to(inputs.device)):
        evaluator = ProfileEvaluator(
            model,
            parameter_names,
            center,
            directions,
            inputs[index],
            targets[index],
            max_batch=max_batch,
            chunk_size=int(index.numel()),
            response_cache_bytes=2 * 1024**3,
        )
        values = evaluator.losses(direction_index, point_offsets).numpy()
        losses[mu, defined] = values.reshape(defined.size, n_offsets)
    return losses


def fit_minibatch_minima(offsets: np.ndarray, losses: np.ndarray) -> MinibatchMinima:
    """Fit ``a + b theta + c theta^2`` to each minibatch profile by least squares.

    Parameters
    ----------
    offsets : ndarray of shape (n_directions, n_offsets)
        Grid of each direction; a row with NaN marks a direction without a grid.
    losses : ndarray of shape (n_minibatches, n_directions, n_offsets)
        ``L^mu_i`` on the grid.

    Returns
    -------
    MinibatchMinima
    """
    offsets = _as_float64(offsets)
    losses = _as_float64(losses)
    if losses.ndim != 3 or losses.shape[1:] != offsets.shape:
        raise ValueError(
            f"losses {losses.shape} must have shape (n_minibatches, *offsets.shape) with "
            f"offsets {offsets.shape}"
        )
    n_minibatches, n_directions, n_offsets = losses.shape
    if n_offsets < 3:
        raise ValueError(f"a quadratic fit needs at least 3 offsets, got {n_offsets}")
    slope = np.full((n_minibatches, n_directions), np.nan)
    quadratic = np.full((n_minibatches, n_directions), np.nan)
    for i in range(n_directions):
        grid = offsets[i]
        if not np.all(np.isfinite(grid)) or np.ptp(grid) == 0:
            continue
        # Offsets are scaled to [-1, 1] so that the design matrix is well conditioned.
        scale = np.abs(grid).max()
        design = np.vander(grid / scale, 3, increasing=True)
        coefficients, *_ = np.linalg.lstsq(design, losses[:, i, :].T, rcond=None)
        slope[:, i] = coefficients[1] / scale
        quadratic[:, i] = coefficients[2] / scale**2
    with np.errstate(invalid="ignore", divide="ignore"):
        minimum = np.where(quadratic > 0, -slope / (2.0 * quadratic), np.nan)
    return MinibatchMinima(
        minimum_offset=minimum,
        curvature=2.0 * quadratic,
        slope=slope,
        half_width=np.abs(offsets).max(axis=1),
    )


def _nan_statistic(function, values: np.ndarray) -> np.ndarray:
    result = np.full(values.shape[1], np.nan)
    present = np.isfinite(values).any(axis=0)
    if present.any():
        result[present] = function(values[:, present], axis=0)
    return result


def _as_float64(values: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)
