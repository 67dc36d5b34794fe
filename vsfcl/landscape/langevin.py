"""Langevin dynamics: full-batch gradient descent with isotropic Gaussian noise.

The update is ``w <- w - alpha grad L(w) + sqrt(2 alpha T) xi`` with ``xi`` a standard
normal vector, drawn afresh at every step and independent across entries. For small
``alpha`` its stationary distribution is ``P(w) ~ exp(-L(w) / T)``, the equilibrium
that Feng and Tu (PNAS 118, e2015617118, 2021) contrast with SGD. Near a minimum with
curvature ``k_i`` along ``p_i`` the variance is ``sigma_i^2 = T / k_i``. A quadratic
profile of flatness ``F_i`` has ``k_i ~ 1 / F_i^2``, so ``sigma_i^2 ~ T F_i^2`` grows
with the flatness. For the discrete update on ``L = k theta^2 / 2`` the exact
stationary variance is ``2 alpha T / (1 - (1 - alpha k)^2) = T / (k (1 - alpha k / 2))``.

The noise has the same ``T`` along every direction, unlike SGD's effective temperature
``T_i``, and the loss is the mean over a fixed set of training samples (usually a
random subset, to keep each step affordable on a CPU).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import grad_and_value

from vsfcl.landscape.profiles import ProfileEvaluator
from vsfcl.landscape.trajectory import flatten_parameters, resolve_parameter_names

log = logging.getLogger(__name__)

TrainedParameters = Literal["analysed", "all"]

# gradient_and_loss(w) -> (gradient of shape (n_params,), loss as a 0-d tensor)
GradientAndLoss = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class LangevinTrajectory:
    """Snapshots recorded during Langevin dynamics.

    Attributes
    ----------
    snapshots : Tensor of shape (n_snapshots, n_recorded), float32
        Recorded entries of the weights, one row per snapshot.
    iterations : Tensor of shape (n_snapshots,), int64
        Step count at each snapshot, counted from the start including the burn-in.
    final : Tensor of shape (n_trained,), float32
        Trained weights after the last step.
    time_average : Tensor of shape (n_trained,), float32
        Average of the trained weights over the recorded snapshots.
    losses : Tensor of shape (n_snapshots,), float64
        Full-batch loss at each snapshot (before that step's update).
    learning_rate : float
    temperature : float
        ``T`` in loss units.
    seconds : float
        Wall-clock time of the dynamics.
    """

    snapshots: Tensor
    iterations: Tensor
    final: Tensor
    time_average: Tensor
    losses: Tensor
    learning_rate: float
    temperature: float
    seconds: float


def langevin_dynamics(
    gradient_and_loss: GradientAndLoss,
    start: Tensor,
    learning_rate: float,
    temperature: float,
    n_steps: int,
    snapshot_interval: int,
    generator: torch.Generator,
    burn_in: int = 0,
    recorded_index: Tensor | None = None,
) -> LangevinTrajectory:
    """Run ``w <- w - alpha grad L(w) + sqrt(2 alpha T) xi`` and record snapshots.

    Parameters
    ----------
    gradient_and_loss : callable
        Maps weights of shape (n_trained,) to the gradient of the loss (same shape)
        and the loss itself.
    start : Tensor of shape (n_trained,)
        Initial weights.
    learning_rate : float
        ``alpha``, per step.
    temperature : float
        ``T`` in loss units; 0 gives plain gradient descent.
    n_steps : int
        Steps after the burn-in.
    snapshot_interval : int
        Steps between snapshots; the first snapshot follows the
        ``snapshot_interval``-th step after the burn-in.
    generator : torch.Generator
        Source of the noise, on the CPU; the noise is drawn there and moved to the
        weights' device.
    burn_in : int
        Steps run before recording starts.
    recorded_index : Tensor of shape (n_recorded,), int64, optional
        Entries of the weights that are recorded; all of them by default.

    Returns
    -------
    LangevinTrajectory
    """
    if not learning_rate > 0:
        raise ValueError(f"learning_rate={learning_rate} must be positive")
    if not temperature >= 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature={temperature} must be a finite number >= 0 (loss units)")
    if snapshot_interval < 1:
        raise ValueError(f"snapshot_interval={snapshot_interval} must be at least 1")
    if burn_in < 0:
        raise ValueError(f"burn_in={burn_in} must be non-negative")
    n_snapshots = n_steps // snapshot_interval if n_steps > 0 else 0
    if n_snapshots < 2:
        raise ValueError(
            f"n_steps={n_steps} at snapshot_interval={snapshot_interval} gives {n_snapshots} "
            "snapshots; the PCA needs at least 2"
        )

    weights = start.detach().clone()
    if recorded_index is None:
        recorded_index = torch.arange(weights.numel())
    recorded_index = recorded_index.to(weights.device)
    noise_scale = math.sqrt(2.0 * learning_rate * temperature)
    snapshots = torch.empty(n_snapshots, recorded_index.numel(), dtype=torch.float32)
    iterations = torch.empty(n_snapshots, dtype=torch.int64)
    losses = torch.empty(n_snapshots, dtype=torch.float64)
    total = torch.zeros_like(weights, dtype=torch.float64)

    started = time.perf_counter()
    recorded = 0
    for step in range(1, burn_in + n_steps + 1):
        gradient, loss = gradient_and_loss(weights)
        record = step > burn_in and (step - burn_in) % snapshot_interval == 0
        if record and recorded < n_snapshots:
            losses[recorded] = float(loss)
        noise = torch.randn(weights.shape, generator=generator, dtype=weights.dtype)
        weights = (
            weights - learning_rate * gradient.detach() + noise_scale * noise.to(weights.device)
        )
        if record and recorded < n_snapshots:
            snapshots[recorded] = weights[recorded_index].to("cpu", torch.float32)
            iterations[recorded] = step
            total += weights.double()
            recorded += 1
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the loss became {float(loss)} at step {step}; lower the learning rate or "
                "the temperature"
            )
    seconds = time.perf_counter() - started
    return LangevinTrajectory(
        snapshots=snapshots,
        iterations=iterations,
        final=weights.to(torch.float32),
        time_average=(total / n_snapshots).to(torch.float32),
        losses=losses,
        learning_rate=float(learning_rate),
        temperature=float(temperature),
        seconds=seconds,
    )


@dataclass(frozen=True)
class ModelLangevin:
    """Langevin trajectory of a network and the parameter layout it refers to.

    Attributes
    ----------
    trajectory : LangevinTrajectory
        ``snapshots`` hold the analysed parameters; ``final`` and ``time_average``
        hold every trained parameter.
    trained_names : list of str
        Parameters updated by the dynamics, in the order of the flat vectors.
    analysed_names : list of str
        Parameters whose entries are recorded, in the order of the snapshot columns.
    n_samples : int
        Training samples in the full-batch loss.
    """

    trajectory: LangevinTrajectory
    trained_names: list[str]
    analysed_names: list[str]
    n_samples: int


def run_langevin(
    model: nn.Module,
    parameter_names: Sequence[str],
    inputs: Tensor,
    targets: Tensor,
    learning_rate: float,
    temperature: float,
    n_steps: int,
    snapshot_interval: int,
    burn_in: int = 0,
    trained: TrainedParameters = "analysed",
    chunk_size: int = 8192,
    seed: int = 0,
) -> ModelLangevin:
    """Run Langevin dynamics on a network's mean cross-entropy over ``inputs``.

    The model is not modified: the dynamics run on a flat copy of the trained
    parameters, starting from their current values in ``model``.

    Parameters
    ----------
    model : nn.Module
        Network at the starting point, for example with every parameter at the time
        average of an SGD window.
    parameter_names : sequence of str
        Analysed parameters, recorded at each snapshot.
    inputs : Tensor of shape (n_samples, ...)
    targets : Tensor of shape (n_samples,), int64
        Training samples of the full-batch loss, on the device the dynamics run on.
    learning_rate, temperature, n_steps, snapshot_interval, burn_in
        As in :func:`langevin_dynamics`.
    trained : {"analysed", "all"}
        "analysed" updates only the analysed parameters and keeps the others at their
        values in ``model``. That is the conditional landscape along which the
        flatness is measured, and the activations before the analysed layer are then
        computed once.
        "all" updates and adds noise to every trainable parameter.
    chunk_size : int
        Samples per chunk of the full-batch loss.
    seed : int
        Seed of the noise.

    Returns
    -------
    ModelLangevin
    """
    if trained not in ("analysed", "all"):
        raise ValueError(f"trained={trained!r} is invalid; use 'analysed' or 'all'")
    analysed_names = resolve_parameter_names(model, list(parameter_names))
    trained_names = (
        analysed_names if trained == "analysed" else resolve_parameter_names(model, "all")
    )
    start = flatten_parameters(model, trained_names).to(inputs.device, torch.float32)

    # The evaluator's loss terms carry the cached activations; its direction is unused.
    placeholder_direction = torch.zeros(1, start.numel(), device=start.device)
    evaluator = ProfileEvaluator(
        model,
        trained_names,
        start,
        placeholder_direction,
        inputs,
        targets,
        chunk_size=chunk_size,
    )
    terms = [grad_and_value(term) for term in evaluator.loss_terms(chunk_size)]

    def gradient_and_loss(weights: Tensor) -> tuple[Tensor, Tensor]:
        gradient = torch.zeros_like(weights)
        loss = torch.zeros((), dtype=torch.float64, device=weights.device)
        # torch.func differentiates with respect to ``weights`` even under no_grad, and
        # no_grad keeps the model's own parameters from recording a graph at every step.
        with torch.no_grad():
            for term in terms:
                term_gradient, term_loss = term(weights)
                gradient += term_gradient
                loss += term_loss.double()
        return gradient, loss

    recorded_index = _positions_of(model, trained_names, analysed_names)
    log.info(
        "Langevin dynamics: %d trained entries (%s), %d recorded, %d samples, alpha=%g, "
        "T=%.3g, %d burn-in + %d steps",
        start.numel(),
        trained,
        recorded_index.numel(),
        inputs.shape[0],
        learning_rate,
        temperature,
        burn_in,
        n_steps,
    )
    trajectory = langevin_dynamics(
        gradient_and_loss,
        start,
        learning_rate,
        temperature,
        n_steps,
        snapshot_interval,
        torch.Generator().manual_seed(seed),
        burn_in=burn_in,
        recorded_index=recorded_index,
    )
    log.info(
        "Langevin dynamics done in %.1f s: loss %.5g at the first snapshot, %.5g at the last",
        trajectory.seconds,
        float(trajectory.losses[0]),
        float(trajectory.losses[-1]),
    )
    return ModelLangevin(
        trajectory=trajectory,
        trained_names=list(trained_names),
        analysed_names=list(analysed_names),
        n_samples=int(inputs.shape[0]),
    )


def _positions_of(model: nn.Module, trained_names: list[str], analysed_names: list[str]) -> Tensor:
    """Return the positions of the analysed entries in the flat vector of the trained parameters."""
    parameters = dict(model.named_parameters())
    positions = []
    offset = 0
    for name in trained_names:
        size = parameters[name].numel()
        if name in analysed_names:
            positions.append(torch.arange(offset, offset + size))
        offset += size
    return torch.cat(positions)
