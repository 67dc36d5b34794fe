r"""Elastic weight consolidation with a choice of Fisher estimate, on the fast tensors.

EWC (Kirkpatrick et al., PNAS 2017) adds ``lambda * sum_e sum_j F_{e,j} (w_j - w*_{e,j})^2``
to the loss, where ``F_e`` is a diagonal Fisher estimate at the end of experience ``e``
and ``w*_e`` the weights there. As in Avalanche 0.6.0's ``EWCPlugin`` there is no
factor 1/2, so ``lambda`` values carry over between the two.

The Fisher estimates (van de Ven, arXiv:2502.11756, compares them) are, per sample
``x`` with label ``y`` and model probabilities ``p(c | x)``:

- ``batched``: the square of the gradient of each minibatch's mean loss with the true
  labels, averaged over minibatches. This is what Avalanche's ``EWCPlugin`` computes.
- ``empirical``: the squared per-sample gradient of ``-log p(y | x)`` with the true
  label, averaged over samples.
- ``sampled``: as ``empirical``, but with one label per sample drawn from ``p(. | x)``.
- ``exact``: the expectation over all labels, ``sum_c p(c | x) g_c^2``, which costs one
  per-sample gradient per class.

Per-sample squared gradients of ``nn.Linear`` layers come from one matrix product per
layer (see :class:`PerSampleSquaredGradients`); other models use
``torch.func.vmap(torch.func.grad(...))``. The samples
are the experience's tensors (``experience.tensors``, see :mod:`vsfcl.tensor_data`) when
the strategy has them, so the importance pass skips Avalanche's per-sample
``DataLoader``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any, Literal

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import avalanche_forward, is_multi_task_module
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.utils.data import DataLoader

from vsfcl.scenarios import ExperienceTensors
from vsfcl.tensor_data import TensorLoader

log = logging.getLogger(__name__)

FisherEstimate = Literal["batched", "empirical", "sampled", "exact"]
FISHER_ESTIMATES = ("batched", "empirical", "sampled", "exact")

Batch = tuple[Tensor, Tensor, Tensor]


def experience_batches(
    strategy: Any, batch_size: int, max_samples: int | None = None
) -> Iterator[Batch]:
    """Yield ``(x, y, t)`` minibatches of the current experience's training data, in order.

    Uses the experience's device tensors when the strategy has the fast data path and
    the experience carries ``tensors``; otherwise iterates Avalanche's dataset with a
    ``DataLoader``. Stops after ``max_samples`` samples (all when None).
    """
    experience = strategy.experience
    tensors_of = getattr(strategy, "_tensors_of", None)
    data: ExperienceTensors | None = tensors_of(experience) if tensors_of is not None else None
    if data is not None:
        batches: Any = TensorLoader(data, batch_size, shuffle=False)
    else:
        dataset = experience.dataset
        batches = DataLoader(
            dataset, batch_size=batch_size, collate_fn=getattr(dataset, "collate_fn", None)
        )

    seen = 0
    for batch in batches:
        x, y, t = (b.to(strategy.device) for b in (batch[0], batch[1], batch[-1]))
        if max_samples is not None and seen + len(y) > max_samples:
            keep = max_samples - seen
            x, y, t = x[:keep], y[:keep], t[:keep]
        if len(y) == 0:
            return
        seen += len(y)
        yield x, y, t
        if max_samples is not None and seen >= max_samples:
            return


def _per_sample_loss_function(model: nn.Module) -> Any:
    """Return ``loss(params, x, y, t)`` for one sample, for ``torch.func.grad``."""
    buffers = dict(model.named_buffers())
    multi_task = is_multi_task_module(model)

    def loss(params: dict[str, Tensor], x: Tensor, y: Tensor, t: Tensor) -> Tensor:
        inputs = (x.unsqueeze(0), t.unsqueeze(0)) if multi_task else (x.unsqueeze(0),)
        output = functional_call(model, (params, buffers), inputs)
        return F.cross_entropy(output, y.unsqueeze(0))

    return loss


def _only_linear_layers(model: nn.Module) -> bool:
    """True when every parameter is the weight or bias of an ``nn.Linear``."""
    linear_parameters = {
        f"{module_name}.{parameter_name}"
        for module_name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        for parameter_name, _ in module.named_parameters(recurse=False)
    }
    return {name for name, _ in model.named_parameters()} <= linear_parameters


class PerSampleSquaredGradients:
    """Sums over samples of squared per-sample loss gradients, ``sum_n w_n g_n^2``.

    In a model made of ``nn.Linear`` layers (and parameter-free modules), the
    per-sample gradient of a weight is the outer product ``delta_n a_n^T`` of the
    gradient at the layer's output and the layer's input. The weighted sum of its
    squares is then the single product ``(w * delta^2)^T a^2``, and no per-sample
    gradient is stored. Any other model, or ``linear_shortcut=False``, goes through
    ``torch.func.vmap(grad(...))``, which stores one gradient per sample and is much
    slower.
    """

    def __init__(self, model: nn.Module, linear_shortcut: bool = True) -> None:
        self.model = model
        self.linear = linear_shortcut and _only_linear_layers(model)
        if not self.linear:
            self._vmapped = vmap(grad(_per_sample_loss_function(model)), in_dims=(None, 0, 0, 0))

    def __call__(
        self, x: Tensor, labels: Tensor, t: Tensor, weights: Tensor | None = None
    ) -> dict[str, Tensor]:
        if not self.linear:
            params = {name: p.detach() for name, p in self.model.named_parameters()}
            squares = {name: g.square() for name, g in self._vmapped(params, x, labels, t).items()}
            if weights is not None:
                squares = {
                    name: s * weights.view(-1, *([1] * (s.dim() - 1)))
                    for name, s in squares.items()
                }
            return {name: s.sum(dim=0) for name, s in squares.items()}
        return self._linear(x, labels, t, weights)

    def _linear(
        self, x: Tensor, labels: Tensor, t: Tensor, weights: Tensor | None
    ) -> dict[str, Tensor]:
        records: list[tuple[str, nn.Linear, Tensor, Tensor]] = []

        def record(name: str) -> Any:
            def hook(module: nn.Linear, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                records.append((name, module, inputs[0], output))

            return hook

        handles = [
            module.register_forward_hook(record(name))
            for name, module in self.model.named_modules()
            if isinstance(module, nn.Linear)
        ]
        try:
            output = avalanche_forward(self.model, x, t)
        finally:
            for handle in handles:
                handle.remove()
        names = [name for name, _, _, _ in records]
        if len(set(names)) != len(names) or any(inputs.dim() != 2 for _, _, inputs, _ in records):
            raise ValueError(
                "the per-sample Fisher shortcut needs every nn.Linear called once per forward "
                f"pass on (batch, features) inputs; calls: {names}"
            )
        # With a summed loss, the gradient at a layer's output row n is sample n's alone.
        loss = F.cross_entropy(output, labels, reduction="sum")
        deltas = torch.autograd.grad(loss, [out for _, _, _, out in records], allow_unused=True)

        sums: dict[str, Tensor] = {}
        for (name, module, inputs, _), delta in zip(records, deltas, strict=False):
            if delta is None:
                continue
            delta_squared = delta.detach().square()
            if weights is not None:
                delta_squared = delta_squared * weights[:, None]
            sums[f"{name}.weight"] = delta_squared.T @ inputs.detach().square()
            if module.bias is not None:
                sums[f"{name}.bias"] = delta_squared.sum(dim=0)
        return sums


def fisher_diagonal(
    model: nn.Module,
    batches: Iterator[Batch],
    estimate: FisherEstimate = "empirical",
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Estimate the diagonal Fisher information of ``model`` on ``batches``.

    Parameters
    ----------
    model : nn.Module
        Evaluated in ``eval`` mode; its training mode is restored afterwards.
    batches : iterator of (x, y, t)
        Inputs, true labels and task labels, all on the model's device.
    estimate : {"batched", "empirical", "sampled", "exact"}
        See the module docstring. ``batched`` depends on the minibatch size; the others
        do not.
    generator : torch.Generator, optional
        CPU generator for the labels drawn by ``sampled``.

    Returns
    -------
    dict of str to Tensor
        One tensor per named parameter, of the parameter's shape: the mean over
        minibatches (``batched``) or over samples (the others).
    """
    if estimate not in FISHER_ESTIMATES:
        raise ValueError(
            f"fisher={estimate!r} is invalid; use one of {', '.join(FISHER_ESTIMATES)}"
        )
    fisher = {
        name: torch.zeros_like(p, requires_grad=False) for name, p in model.named_parameters()
    }
    squared_gradients = PerSampleSquaredGradients(model)
    count = 0
    was_training = model.training
    model.eval()
    try:
        for x, y, t in batches:
            if estimate == "batched":
                _add_batched(model, x, y, t, fisher)
                count += 1
                continue
            if estimate == "empirical":
                _add(fisher, squared_gradients(x, y, t))
            else:
                with torch.no_grad():
                    probabilities = torch.softmax(avalanche_forward(model, x, t), dim=1)
                if estimate == "sampled":
                    labels = torch.multinomial(probabilities.cpu().double(), 1, generator=generator)
                    _add(fisher, squared_gradients(x, labels.squeeze(1).to(x.device), t))
                else:
                    for label in range(probabilities.shape[1]):
                        labels = torch.full_like(y, label)
                        _add(fisher, squared_gradients(x, labels, t, probabilities[:, label]))
            count += len(y)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError(
            "the Fisher estimate needs at least one sample, but the experience has none"
        )
    return {name: value / count for name, value in fisher.items()}


def _add_batched(
    model: nn.Module, x: Tensor, y: Tensor, t: Tensor, fisher: dict[str, Tensor]
) -> None:
    names = list(fisher)
    parameters = [p for _, p in model.named_parameters()]
    loss = F.cross_entropy(avalanche_forward(model, x, t), y)
    gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
    for name, gradient in zip(names, gradients, strict=False):
        if gradient is not None:
            fisher[name] += gradient.square()


def _add(fisher: dict[str, Tensor], sums: dict[str, Tensor]) -> None:
    for name, value in sums.items():
        fisher[name] += value


class DiagonalQuadraticPenalty:
    r"""A sum of diagonal quadratics ``sum_e sum_j F_{e,j} (w_j - a_{e,j})^2``, kept in one piece.

    The sum over past experiences ``e`` is stored as ``A (w - m)^2 + c`` per parameter,
    with ``A = sum_e F_e``, ``m`` the ``F``-weighted mean of the anchors and ``c`` a
    constant, so that its cost per step does not grow with the number of experiences.
    The constant is accumulated in float64 as ``A_old (m_old - m)^2 + F (a - m)^2`` to
    avoid the cancellation of the expanded form.
    """

    def __init__(self) -> None:
        self.precision: dict[str, Tensor] = {}
        self.mean: dict[str, Tensor] = {}
        self.offset = 0.0

    @property
    def empty(self) -> bool:
        return not self.precision

    @torch.no_grad()
    def add(self, importances: dict[str, Tensor], anchor: dict[str, Tensor]) -> None:
        """Add one experience's quadratic with curvature ``importances`` around ``anchor``."""
        for name, importance in importances.items():
            point = anchor[name].detach().clone()
            if name not in self.precision:
                self.precision[name] = importance.clone()
                self.mean[name] = point
                continue
            old_precision, old_mean = self.precision[name], self.mean[name]
            precision = old_precision + importance
            # Where no experience gives weight, the mean is irrelevant; keep the new anchor.
            safe = torch.where(precision > 0, precision, torch.ones_like(precision))
            mean = torch.where(
                precision > 0, (old_precision * old_mean + importance * point) / safe, point
            )
            self.offset += float(
                (old_precision.double() * (old_mean - mean).double().square()).sum()
                + (importance.double() * (point - mean).double().square()).sum()
            )
            self.precision[name], self.mean[name] = precision, mean

    @torch.no_grad()
    def decay_and_add(
        self, importances: dict[str, Tensor], anchor: dict[str, Tensor], decay: float
    ) -> None:
        """Online EWC: ``F <- decay * F + F_new``, anchored at ``anchor`` alone."""
        for name, importance in importances.items():
            old = self.precision.get(name)
            self.precision[name] = importance.clone() if old is None else decay * old + importance
            self.mean[name] = anchor[name].detach().clone()
        self.offset = 0.0

    def __call__(self, model: nn.Module) -> Tensor:
        """Return the penalty at the model's current weights, differentiable in them."""
        terms = [
            (self.precision[name] * (p - self.mean[name]).square()).sum()
            for name, p in model.named_parameters()
            if name in self.precision
        ]
        return torch.stack(terms).sum() + self.offset


class EWCPlugin(SupervisedPlugin):
    """EWC and online EWC with a choice of Fisher estimate and a fast importance pass.

    Parameters
    ----------
    ewc_lambda : float
        Penalty strength ``lambda``; non-negative. Same scale as Avalanche's ``EWCPlugin``.
    fisher : {"batched", "empirical", "sampled", "exact"}
        How the diagonal Fisher is estimated; see :func:`fisher_diagonal`.
    mode : {"separate", "online"}
        ``separate`` keeps one quadratic per past experience (Kirkpatrick et al., 2017);
        ``online`` keeps one running Fisher ``F <- decay_factor * F + F_new`` anchored at
        the latest weights (Schwarz et al., 2018).
    decay_factor : float
        Used by ``online`` only; in [0, 1].
    fisher_samples : int, optional
        Estimate the Fisher on the first this many training samples of the experience;
        all when None.
    batch_size : int, optional
        Minibatch size of the importance pass; the strategy's training minibatch size
        when None. ``batched`` depends on it, as Avalanche's does.
    seed : int
        Seeds the labels drawn by ``fisher="sampled"``.
    """

    def __init__(
        self,
        ewc_lambda: float,
        fisher: FisherEstimate = "batched",
        mode: Literal["separate", "online"] = "separate",
        decay_factor: float = 1.0,
        fisher_samples: int | None = None,
        batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if fisher not in FISHER_ESTIMATES:
            raise ValueError(
                f"fisher={fisher!r} is invalid; use one of {', '.join(FISHER_ESTIMATES)}"
            )
        if mode not in ("separate", "online"):
            raise ValueError(f"mode={mode!r} is invalid; use 'separate' or 'online'")
        if not 0.0 <= decay_factor <= 1.0:
            raise ValueError(f"decay_factor={decay_factor} is out of range; it must be in [0, 1]")
        if fisher_samples is not None and fisher_samples < 1:
            raise ValueError(
                f"fisher_samples={fisher_samples} must be a positive count or null for all"
            )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.ewc_lambda = float(ewc_lambda)
        self.fisher = fisher
        self.mode = mode
        self.decay_factor = float(decay_factor)
        self.fisher_samples = fisher_samples
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.penalty = DiagonalQuadraticPenalty()
        self.consolidation_seconds: list[float] = []
        self.last_penalty = 0.0

    def state_dict(self) -> dict[str, Any]:
        """Return what the plugin keeps between experiences, as tensors and plain values (for checkpoints)."""
        return {
            "precision": dict(self.penalty.precision),
            "mean": dict(self.penalty.mean),
            "offset": float(self.penalty.offset),
            "generator": self.generator.get_state(),
            "consolidation_seconds": list(self.consolidation_seconds),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state returned by :meth:`state_dict`."""
        self.penalty.precision = dict(state["precision"])
        self.penalty.mean = dict(state["mean"])
        self.penalty.offset = float(state["offset"])
        self.generator.set_state(state["generator"].cpu())
        self.consolidation_seconds = list(state["consolidation_seconds"])

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.penalty.empty or self.ewc_lambda == 0.0:
            return
        penalty = self.ewc_lambda * self.penalty(strategy.model)
        strategy.loss = strategy.loss + penalty
        self.last_penalty = float(penalty.detach())

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        batches = experience_batches(
            strategy, self.batch_size or strategy.train_mb_size, self.fisher_samples
        )
        importances = fisher_diagonal(strategy.model, batches, self.fisher, self.generator)
        anchor = {name: p.detach() for name, p in strategy.model.named_parameters()}
        if self.mode == "online":
            self.penalty.decay_and_add(importances, anchor, self.decay_factor)
        else:
            self.penalty.add(importances, anchor)
        self.consolidation_seconds.append(time.perf_counter() - start)
        log.info(
            "EWC (%s Fisher): importance pass took %.2f s",
            self.fisher,
            self.consolidation_seconds[-1],
        )
