"""The flatness-aware regularizer as an Avalanche plugin.

:class:`FlatnessPlugin` works inside any Avalanche strategy built on
``SupervisedTemplate`` (Naive, Replay, LwF, ...). While the strategy trains on an
experience, the plugin records snapshots of the regularized parameters over the last
part of training. After the experience it runs PCA on the snapshots, keeps the top-K
principal directions (the sharp ones, by the inverse variance-flatness relation),
gives each a stiffness and anchors them at the final weights. On later experiences it
adds ``(lambda/2) sum_i k_i (p_i . (w - w*))^2`` to the loss, accumulated over all past
experiences. See :mod:`vsfcl.regularizer` for the derivation.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import avalanche_forward
from torch import Tensor, nn

from vsfcl.flatness import curvature_from_flatness, find_flatness
from vsfcl.pca import remove_linear_drift, trajectory_pca
from vsfcl.regularizer import SharpSubspace, SubspacePenalty, stiffness_from_variance

log = logging.getLogger(__name__)


class ProbeDivergenceError(ValueError):
    """The SGD probe, or the training before it, reached a non-finite loss."""


StiffnessSource = Literal["flatness", "variance", "hessian"]
_STIFFNESS_SOURCES = ("flatness", "variance", "hessian")
UpdateRule = Literal["gradient", "decoupled"]
_UPDATE_RULES = ("gradient", "decoupled")
TrajectorySource = Literal["training", "sgd_probe"]
_TRAJECTORY_SOURCES = ("training", "sgd_probe")


@dataclass
class Consolidation:
    """Measurements taken by the plugin after one experience."""

    experience: int
    n_snapshots: int
    n_directions: int
    variances: list[float]
    stiffness: list[float]
    flatness: list[float | None] = field(default_factory=list)
    n_censored: int = 0
    n_loss_evaluations: int = 0
    loss0: float | None = None
    seconds: float = 0.0


def select_parameters(
    model: nn.Module, patterns: Sequence[str] | None
) -> list[tuple[str, nn.Parameter]]:
    """Return the named parameters whose names match any of the ``fnmatch`` patterns.

    ``None`` selects every parameter. A pattern that matches nothing raises, so that a
    typo does not silently regularize nothing.
    """
    named = list(model.named_parameters())
    if patterns is None:
        return named
    selected = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in named):
            raise ValueError(
                f"parameter pattern {pattern!r} matches no parameter of the model; "
                f"available names: {[n for n, _ in named]}"
            )
    return selected


def flatten(parameters: Sequence[Tensor]) -> Tensor:
    """Concatenate parameters into one vector of shape (n_params,), keeping the graph."""
    return torch.cat([p.reshape(-1) for p in parameters])


@torch.no_grad()
def assign(parameters: Sequence[Tensor], weights: Tensor) -> None:
    """Copy a flat vector into the parameters in place.

    Unlike ``torch.nn.utils.vector_to_parameters``, this never makes a parameter a view
    of ``weights``, so later training cannot modify a stored anchor.
    """
    start = 0
    for parameter in parameters:
        stop = start + parameter.numel()
        parameter.copy_(weights[start:stop].view_as(parameter))
        start = stop


class FlatnessPlugin(SupervisedPlugin):
    """Penalize motion along the sharp principal directions of past experiences.

    Defaults: ``K = 20`` directions per experience from 40 snapshots over the last half
    of each experience's iterations, all parameters, stiffness from the measured
    flatness ``k_i = 8 (e - 1) L_0 / F_i^2`` on 256 training samples, and
    ``lambda = 1``. The training command's config (``conf/strategy/flatness.yaml``)
    overrides ``lambda`` with the value tuned on validation data.

    Parameters
    ----------
    strength : float
        ``lambda``, the overall weight of the penalty; non-negative. With
        ``stiffness="flatness"``, 1 means the quadratic model of the old loss itself.
    n_directions : int
        ``K``, the principal directions kept per experience; must be smaller than
        ``n_snapshots`` because ``n`` centred snapshots span at most ``n - 1``
        directions.
    stiffness : {"flatness", "variance", "hessian"}
        Source of ``k_i``: ``8 (e - 1) L_0 / F_i^2`` from loss profiles, the variance
        alone through ``sigma^2 ~ F^-psi``, or the Hessian curvature ``p^T H p``.
    n_snapshots : int
        Snapshots recorded per experience, evenly spaced over the window.
    window_fraction : float
        Fraction of an experience's training iterations, counted from the end, over
        which snapshots are taken; in (0, 1].
    parameters : sequence of str, optional
        ``fnmatch`` patterns of the parameter names to regularize; all by default.
    psi : float
        Exponent of ``sigma^2 ~ F^-psi`` used by ``stiffness="variance"``.
    profile_samples : int
        Training samples of the experience on which ``L_0`` and the loss profiles (or
        the Hessian) are evaluated.
    profile_max_offset : float
        Largest offset along a direction searched for the ``e L_0`` crossing, in weight
        units. A direction whose loss stays below ``e L_0`` up to this offset is
        censored and gets the stiffness of flatness ``2 * profile_max_offset``.
    profile_rtol : float
        Relative precision of the located crossings.
    profile_initial_step : float
        First offset tried on each side of the anchor, in weight units; the search
        doubles it until the loss reaches ``e L_0``, then refines the bracket. A value
        near the expected half-flatness saves loss evaluations.
    max_directions : int, optional
        Cap on the directions kept over all past experiences. ``None`` keeps ``K`` per
        experience, so the cost per step grows with the number of past experiences.
        With a cap, each experience's penalty is merged into the sum of the earlier
        ones and only the ``max_directions`` stiffest directions of that sum are kept
        (see :func:`vsfcl.regularizer.merge_subspaces`), so the cost stays constant.
    update : {"gradient", "decoupled"}
        How the penalty acts. ``"gradient"`` adds its gradient to the loss's, so the
        optimizer receives both. ``"decoupled"`` leaves the optimizer to the data loss and,
        after each optimizer step, takes one proximal step of the penalty with the
        optimizer's learning rate: along each kept direction the displacement from the
        anchor shrinks by ``1 / (1 + lr * lambda * k_i)``. With Adam, the gradient of a
        stiff penalty along dense directions inflates every parameter's second-moment
        estimate, which slows learning of the new experience. The decoupled step
        avoids that, as AdamW does for weight decay.
    remove_drift : bool
        Subtract each weight's straight-line trend over the window before PCA, so that
        the kept directions are those of the fluctuations, not of the steady drift
        that otherwise fills the first component (see
        :func:`vsfcl.pca.remove_linear_drift`). Needs at least 3 snapshots.
    trajectory : {"training", "sgd_probe"}
        Where the snapshots come from. ``"training"``: the strategy's own training
        steps over the window. ``"sgd_probe"``: after the experience, a separate run
        of plain SGD from the final weights on the experience's minibatches
        (``n_snapshots * probe_interval`` steps at ``probe_lr``), after which the
        weights are put back. The inverse variance-flatness relation is a property of
        SGD; with Adam the high-variance directions are the flat ones (we measured
        ``psi = -4`` in the landscape sweep), so a model trained with Adam needs the
        probe for the top principal directions to be the sharp ones.
    probe_lr : float
        Learning rate of the SGD probe; > 0.
    probe_interval : int
        SGD steps of the probe between two snapshots; >= 1.
    """

    def __init__(
        self,
        strength: float = 1.0,
        n_directions: int = 20,
        stiffness: StiffnessSource = "flatness",
        n_snapshots: int = 40,
        window_fraction: float = 0.5,
        parameters: Sequence[str] | None = None,
        psi: float = 4.0,
        profile_samples: int = 256,
        profile_max_offset: float = 50.0,
        profile_rtol: float = 1e-2,
        profile_initial_step: float = 1.0,
        max_directions: int | None = None,
        update: UpdateRule = "gradient",
        remove_drift: bool = False,
        trajectory: TrajectorySource = "training",
        probe_lr: float = 0.01,
        probe_interval: int = 5,
    ) -> None:
        super().__init__()
        if not isinstance(strength, (int, float)) or not math.isfinite(strength) or strength < 0:
            raise ValueError(
                f"strength (lambda)={strength!r} is invalid; it must be a finite number >= 0"
            )
        if stiffness not in _STIFFNESS_SOURCES:
            raise ValueError(f"stiffness={stiffness!r} is invalid; use one of {_STIFFNESS_SOURCES}")
        if n_snapshots < 2:
            raise ValueError(f"n_snapshots={n_snapshots} must be at least 2 for PCA")
        if not 1 <= n_directions < n_snapshots:
            raise ValueError(
                f"n_directions={n_directions} is out of range: K must be between 1 and "
                f"n_snapshots - 1 = {n_snapshots - 1}, because {n_snapshots} centred "
                "snapshots span at most that many directions; lower K or raise n_snapshots"
            )
        if not 0.0 < window_fraction <= 1.0:
            raise ValueError(
                f"window_fraction={window_fraction} is out of range; it must be in (0, 1], "
                "the fraction of an experience's iterations (from the end) used for snapshots"
            )
        if psi <= 0:
            raise ValueError(f"psi={psi} must be positive")
        if trajectory not in _TRAJECTORY_SOURCES:
            raise ValueError(
                f"trajectory={trajectory!r} is invalid; use one of {_TRAJECTORY_SOURCES}"
            )
        if not (isinstance(probe_lr, (int, float)) and math.isfinite(probe_lr) and probe_lr > 0):
            raise ValueError(f"probe_lr={probe_lr!r} is invalid; it must be a finite number > 0")
        if probe_interval < 1:
            raise ValueError(f"probe_interval={probe_interval} must be at least 1")
        if update not in _UPDATE_RULES:
            raise ValueError(f"update={update!r} is invalid; use one of {_UPDATE_RULES}")
        if max_directions is not None and max_directions < 1:
            raise ValueError(
                f"max_directions={max_directions} is invalid; it must be at least 1, or "
                "null (None) to keep n_directions per experience"
            )
        if remove_drift and n_directions > n_snapshots - 2:
            raise ValueError(
                f"n_directions={n_directions} is out of range with remove_drift: removing "
                "a straight-line trend leaves n_snapshots - 2 = "
                f"{n_snapshots - 2} directions with variance; lower K or raise n_snapshots"
            )
        if profile_samples < 1:
            raise ValueError(f"profile_samples={profile_samples} must be at least 1")
        if profile_max_offset <= 0:
            raise ValueError(f"profile_max_offset={profile_max_offset} must be positive")
        if not 0 < profile_initial_step <= profile_max_offset:
            raise ValueError(
                f"profile_initial_step={profile_initial_step} is out of range; it must be "
                f"in (0, profile_max_offset={profile_max_offset}]"
            )

        self.strength = float(strength)
        self.n_directions = n_directions
        self.stiffness_source: StiffnessSource = stiffness
        self.n_snapshots = n_snapshots
        self.window_fraction = window_fraction
        self.parameter_patterns = None if parameters is None else list(parameters)
        self.psi = psi
        self.profile_samples = profile_samples
        self.profile_max_offset = profile_max_offset
        self.profile_rtol = profile_rtol
        self.profile_initial_step = profile_initial_step

        self.max_directions = max_directions
        self.update: UpdateRule = update
        self.remove_drift = bool(remove_drift)
        self.trajectory: TrajectorySource = trajectory
        self.probe_lr = float(probe_lr)
        self.probe_interval = int(probe_interval)
        self.penalty = SubspacePenalty(max_rows=max_directions)
        self.consolidations: list[Consolidation] = []
        self.last_penalty = 0.0
        self._displacement: Tensor | None = None
        self._names: list[str] | None = None
        self._snapshots: list[Tensor] = []
        self._iteration = 0
        self._window_start = 0
        self._interval = 1

    # ------------------------------------------------------------------ hooks

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._snapshots = []
        self._iteration = 0
        self.penalty.to(strategy.device)
        if self.trajectory != "training":
            return
        n_iterations = strategy.train_epochs * len(strategy.dataloader)
        window = max(1, int(round(self.window_fraction * n_iterations)))
        if window < self.n_snapshots:
            log.warning(
                "snapshot window of %d iterations is shorter than n_snapshots=%d; "
                "recording one snapshot per iteration",
                window,
                self.n_snapshots,
            )
        self._window_start = n_iterations - window
        self._interval = max(1, window // self.n_snapshots)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        self._displacement = None
        if self.update != "gradient" or self.penalty.n_rows == 0 or self.strength == 0.0:
            self.last_penalty = 0.0
            return
        parameters = [p for _, p in self._parameters(strategy.model)]
        self._displacement = self.penalty.displacement(parameters)
        penalty = self.strength * self.penalty.value(self._displacement)
        self.last_penalty = float(penalty)
        # The value joins the loss for logging and the divergence check. Its gradient is
        # added in after_backward, which is cheaper than differentiating it.
        strategy.loss = strategy.loss + penalty

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self._displacement is None:
            return
        parameters = [p for _, p in self._parameters(strategy.model)]
        self.penalty.accumulate_gradient(parameters, self._displacement, self.strength)
        self._displacement = None

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        if self.update != "decoupled" or self.penalty.n_rows == 0 or self.strength == 0.0:
            return
        learning_rate = float(strategy.optimizer.param_groups[0]["lr"])
        parameters = [p for _, p in self._parameters(strategy.model)]
        displacement = self.penalty.proximal_step(parameters, learning_rate * self.strength)
        self.last_penalty = float(self.strength * self.penalty.value(displacement))

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self.trajectory != "training":
            return
        offset = self._iteration - self._window_start
        self._iteration += 1
        if offset < 0 or offset % self._interval != 0 or len(self._snapshots) >= self.n_snapshots:
            return
        with torch.no_grad():
            weights = flatten([p for _, p in self._parameters(strategy.model)])
            self._snapshots.append(weights.detach().to("cpu", torch.float32, copy=True))

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        experience = int(strategy.experience.current_experience)
        if self.trajectory == "sgd_probe":
            self._snapshots = self._probe(strategy, experience)
        if len(self._snapshots) < 2:
            log.warning(
                "experience %d: only %d snapshot(s) recorded, so no directions are kept; "
                "train longer or raise window_fraction",
                experience,
                len(self._snapshots),
            )
            return
        consolidation = self._consolidate(strategy, experience)
        consolidation.seconds = time.perf_counter() - start
        self.consolidations.append(consolidation)
        self._snapshots = []
        log.info(
            "experience %d: kept %d directions, stiffness %.3g..%.3g, %d censored, %.2f s",
            experience,
            consolidation.n_directions,
            min(consolidation.stiffness),
            max(consolidation.stiffness),
            consolidation.n_censored,
            consolidation.seconds,
        )

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Return what the plugin keeps between experiences, as tensors and plain values.

        The result contains the anchors, directions and stiffness of every past
        experience, the consolidation records and the regularized parameter names; it
        loads with ``torch.load(..., weights_only=True)``. Snapshots of an unfinished
        experience are not included, so save only between experiences.
        """
        return {
            "subspaces": [
                {
                    "anchor": s.anchor,
                    "directions": s.directions,
                    "stiffness": s.stiffness,
                    "experience": int(s.experience),
                }
                for s in self.penalty.subspaces
            ],
            "consolidations": [dict(vars(c)) for c in self.consolidations],
            "parameter_names": None if self._names is None else list(self._names),
            "last_penalty": float(self.last_penalty),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state returned by :meth:`state_dict`, replacing the current one."""
        self.penalty.replace_all([SharpSubspace(**subspace) for subspace in state["subspaces"]])
        self.consolidations = [Consolidation(**record) for record in state["consolidations"]]
        names = state["parameter_names"]
        self._names = None if names is None else list(names)
        self.last_penalty = float(state["last_penalty"])
        self._snapshots = []

    # ------------------------------------------------------------ consolidation

    def _parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        selected = select_parameters(model, self.parameter_patterns)
        names = [n for n, _ in selected]
        if self._names is None:
            self._names = names
        elif names != self._names:
            raise RuntimeError(
                "the regularized parameters changed between experiences "
                f"({self._names} before, {names} now); use a model with a fixed parameter set"
            )
        return selected

    def _probe(self, strategy: Any, experience: int) -> list[Tensor]:
        """Run the SGD probe from the current weights; return its snapshots and restore them."""
        model = strategy.model
        parameters = [p for _, p in self._parameters(model)]
        anchor = flatten(parameters).detach().clone()
        snapshots: list[Tensor] = []
        n_steps = self.n_snapshots * self.probe_interval
        was_training = model.training
        model.train()
        step = 0
        try:
            while step < n_steps:
                for batch in strategy.dataloader:
                    x, y, t = (b.to(strategy.device) for b in (batch[0], batch[1], batch[-1]))
                    loss = strategy._criterion(avalanche_forward(model, x, t), y)
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        if step == 0:
                            raise ProbeDivergenceError(
                                f"the training loss at the end of experience {experience} "
                                f"is {value} on a minibatch, before the SGD probe "
                                "moved; training diverged, so lower the learning rate or "
                                "the penalty strength"
                            )
                        raise ProbeDivergenceError(
                            f"the SGD probe after experience {experience} diverged at step "
                            f"{step} (loss {value}); lower strategy.probe_lr="
                            f"{self.probe_lr:g}"
                        )
                    gradients = torch.autograd.grad(loss, parameters)
                    with torch.no_grad():
                        for parameter, gradient in zip(parameters, gradients, strict=True):
                            parameter.add_(gradient, alpha=-self.probe_lr)
                    step += 1
                    if step % self.probe_interval == 0:
                        weights = flatten(parameters).detach()
                        snapshots.append(weights.to("cpu", torch.float32, copy=True))
                    if step >= n_steps:
                        break
        finally:
            assign(parameters, anchor)
            model.train(was_training)
        return snapshots

    def _consolidate(self, strategy: Any, experience: int) -> Consolidation:
        snapshots = torch.stack(self._snapshots)  # (n_snapshots, n_params)
        n_directions = min(self.n_directions, snapshots.shape[0] - 1)
        if n_directions < self.n_directions:
            log.warning(
                "experience %d: %d snapshots allow only %d of the requested %d directions",
                experience,
                snapshots.shape[0],
                n_directions,
                self.n_directions,
            )
        if self.remove_drift and snapshots.shape[0] >= 3:
            snapshots = remove_linear_drift(snapshots)
        elif self.remove_drift:
            log.warning(
                "experience %d: %d snapshots are too few to remove a drift (3 needed); "
                "using them as they are",
                experience,
                snapshots.shape[0],
            )
        # Only the leading directions are kept, so single precision is enough.
        pca = trajectory_pca(snapshots, n_directions, precision=torch.float32)
        parameters = [p for _, p in self._parameters(strategy.model)]
        anchor = flatten(parameters).detach().clone()
        # Snapshots are stored in float32; the penalty works in the model's precision.
        directions = pca.directions.to(anchor.device, anchor.dtype)
        variances = pca.variances.to(anchor.device, anchor.dtype)

        consolidation = Consolidation(
            experience=experience,
            n_snapshots=int(snapshots.shape[0]),
            n_directions=n_directions,
            variances=pca.variances.tolist(),
            stiffness=[],
        )
        if self.stiffness_source == "variance":
            stiffness = stiffness_from_variance(variances, self.psi)
        else:
            inputs, targets, tasks = self._profile_batch(strategy)
            if self.stiffness_source == "flatness":
                stiffness = self._stiffness_from_flatness(
                    strategy,
                    parameters,
                    anchor,
                    directions,
                    variances,
                    (inputs, targets, tasks),
                    consolidation,
                )
            else:
                stiffness = self._stiffness_from_hessian(
                    strategy, parameters, directions, (inputs, targets, tasks)
                )

        consolidation.stiffness = stiffness.tolist()
        self.penalty.add(
            SharpSubspace(
                anchor=anchor, directions=directions, stiffness=stiffness, experience=experience
            )
        )
        return consolidation

    def _profile_batch(self, strategy: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Collect up to ``profile_samples`` training samples of the current experience."""
        xs, ys, ts, count = [], [], [], 0
        for batch in strategy.dataloader:
            x, y, t = batch[0], batch[1], batch[-1]
            xs.append(x.to(strategy.device))
            ys.append(y.to(strategy.device))
            ts.append(t.to(strategy.device))
            count += int(y.shape[0])
            if count >= self.profile_samples:
                break
        n = self.profile_samples
        return torch.cat(xs)[:n], torch.cat(ys)[:n], torch.cat(ts)[:n]

    @torch.no_grad()
    def _stiffness_from_flatness(
        self,
        strategy: Any,
        parameters: list[nn.Parameter],
        anchor: Tensor,
        directions: Tensor,
        variances: Tensor,
        batch: tuple[Tensor, Tensor, Tensor],
        consolidation: Consolidation,
    ) -> Tensor:
        model = strategy.model
        inputs, targets, tasks = batch
        was_training = model.training
        model.eval()

        def loss_at(weights: Tensor) -> float:
            assign(parameters, weights)
            output = avalanche_forward(model, inputs, tasks)
            return float(strategy._criterion(output, targets))

        def loss_along(direction_index: Tensor, offsets: Tensor) -> Tensor:
            values = [
                loss_at(anchor + float(o) * directions[int(i)])
                for i, o in zip(direction_index.tolist(), offsets.tolist(), strict=False)
            ]
            return torch.tensor(values, dtype=torch.float64)

        try:
            loss0 = loss_at(anchor)
            if loss0 <= 0.0 or not math.isfinite(loss0):
                raise ValueError(
                    f"the training loss at the end of experience {consolidation.experience} "
                    f"is L_0={loss0!r}, so the e*L_0 flatness level is undefined; use "
                    "stiffness='variance' or evaluate on more samples (profile_samples)"
                )
            result = find_flatness(
                loss_along,
                n_directions=directions.shape[0],
                loss0=loss0,
                initial_step=self.profile_initial_step,
                max_offset=self.profile_max_offset,
                rtol=self.profile_rtol,
            )
        finally:
            assign(parameters, anchor)
            model.train(was_training)

        # A censored direction is at least as flat as the searched range.
        flatness = torch.where(
            result.censored,
            torch.full_like(result.flatness, 2.0 * self.profile_max_offset),
            result.flatness,
        )
        consolidation.loss0 = loss0
        consolidation.n_censored = int(result.censored.sum())
        consolidation.n_loss_evaluations = result.n_evaluations
        consolidation.flatness = [
            None if bool(c) else float(f)
            for f, c in zip(result.flatness, result.censored, strict=False)
        ]
        return curvature_from_flatness(flatness, loss0).to(anchor.device, anchor.dtype)

    def _stiffness_from_hessian(
        self,
        strategy: Any,
        parameters: list[nn.Parameter],
        directions: Tensor,
        batch: tuple[Tensor, Tensor, Tensor],
    ) -> Tensor:
        model = strategy.model
        inputs, targets, tasks = batch
        was_training = model.training
        model.eval()
        try:
            loss = strategy._criterion(avalanche_forward(model, inputs, tasks), targets)
            gradient = flatten(torch.autograd.grad(loss, parameters, create_graph=True))
            curvatures = []
            for direction in directions:
                hvp = torch.autograd.grad(gradient @ direction, parameters, retain_graph=True)
                curvatures.append(flatten(hvp).detach() @ direction)
        finally:
            model.train(was_training)
        curvature = torch.stack(curvatures)
        negative = int((curvature < 0).sum())
        if negative:
            log.warning(
                "%d directions have negative curvature; their stiffness is set to 0", negative
            )
        return curvature.clamp_min(0.0)
