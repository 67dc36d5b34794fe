"""Baseline plugins that need more than Avalanche 0.6.0's own: SI that works on CPU, MAS on the fast tensors and LwF for multi-head MLPs.

EWC and online EWC are in :mod:`vsfcl.ewc`.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import avalanche_forward, is_multi_task_module
from avalanche.training.plugins import MASPlugin, SynapticIntelligencePlugin
from avalanche.training.utils import ParamData, zerolike_params_dict
from torch import Tensor, nn
from torch.nn import functional as F

from vsfcl.ewc import experience_batches

log = logging.getLogger(__name__)


class CopyingSynapticIntelligencePlugin(SynapticIntelligencePlugin):
    """Avalanche 0.6.0's ``SynapticIntelligencePlugin`` (Zenke et al., 2017) with its weight copies fixed on CPU.

    Avalanche stores the anchor and the weights before each step as
    ``param.detach().cpu().flatten()``. On a CPU model that is a view of the parameter,
    not a copy, so the optimizer moves the stored weights too. Every weight change is
    then zero, every importance is 0 and the penalty stays 0 at any ``si_lambda``
    (checked on split MNIST: the accuracies equal naive fine-tuning). This subclass
    clones the stored weights after Avalanche extracts them. On CUDA, ``.cpu()``
    already copies, and the clone changes nothing.
    """

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        super().before_training_exp(strategy, **kwargs)
        _clone_values(self.ewc_data[0])

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        super().before_training_iteration(strategy, **kwargs)
        _clone_values(self.syn_data["old_theta"])

    def state_dict(self) -> dict[str, Any]:
        """Return the anchor, importances and path integrals as tensors (for checkpoints)."""
        return {
            "anchor": _tensors(self.ewc_data[0]),
            "importance": _tensors(self.ewc_data[1]),
            "syn_data": {key: _tensors(values) for key, values in self.syn_data.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state returned by :meth:`state_dict`."""
        self.ewc_data = (_param_data(state["anchor"]), _param_data(state["importance"]))
        self.syn_data = {key: _param_data(values) for key, values in state["syn_data"].items()}


def _clone_values(values: dict[str, Any]) -> None:
    for value in values.values():
        value.data = value.data.clone()


def _tensors(values: dict[str, ParamData]) -> dict[str, Tensor]:
    return {name: value.data for name, value in values.items()}


def _param_data(tensors: dict[str, Tensor]) -> dict[str, ParamData]:
    return {
        name: ParamData(name, init_tensor=value, device=value.device)
        for name, value in tensors.items()
    }


class TensorMASPlugin(MASPlugin):
    """Avalanche's ``MASPlugin`` (Aljundi et al., 2018) with the importance pass on the experience's tensors.

    The importance is the same as Avalanche 0.6.0's: the mean over minibatches of the
    absolute gradient of the minibatch-mean squared L2 norm of the outputs, with the
    model in training mode. Avalanche then blends it into the running importance as
    ``alpha * old + (1 - alpha) * new`` and anchors the penalty
    ``lambda * sum_j Omega_j (w_j - w*_j)^2`` at the latest weights.
    """

    def __init__(self, lambda_reg: float = 1.0, alpha: float = 0.5) -> None:
        super().__init__(lambda_reg=lambda_reg, alpha=alpha)
        self.consolidation_seconds: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        """Return the anchor and importance as tensors (for checkpoints)."""
        return {
            "params": _tensors(self.params or {}),
            "importance": _tensors(self.importance or {}),
            "consolidation_seconds": list(self.consolidation_seconds),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state returned by :meth:`state_dict`."""
        self.params = _param_data(state["params"]) or None
        self.importance = _param_data(state["importance"]) or None
        self.consolidation_seconds = list(state["consolidation_seconds"])

    def _get_importance(self, strategy: Any) -> dict[str, Any]:
        start = time.perf_counter()
        model = strategy.model
        importance = dict(zerolike_params_dict(model))
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        parameters = [p for _, p in model.named_parameters() if p.requires_grad]
        n_batches = 0
        model.train()
        for x, _, t in experience_batches(strategy, strategy.train_mb_size):
            output = avalanche_forward(model, x, t)
            loss = output.square().sum(dim=1).mean()
            gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
            for name, gradient in zip(names, gradients, strict=False):
                # Heads that the minibatch does not use get no gradient.
                if gradient is not None:
                    importance[name].data += gradient.abs()
            n_batches += 1
        for value in importance.values():
            value.data /= float(max(n_batches, 1))
        self.consolidation_seconds.append(time.perf_counter() - start)
        return importance


class LwFPlugin(SupervisedPlugin):
    """Learning without Forgetting (Li and Hoiem, 2017): distil the previous model's outputs.

    While training on experience ``k > 0``, adds ``alpha * sum_h KL(q_h || p_h)`` to the
    loss. Here ``q_h`` and ``p_h`` are the temperature-``T`` softmax outputs of the model
    saved after experience ``k - 1`` and of the current model on the current inputs.
    They cover the output units of head ``h`` that past experiences trained. A single-head
    model has one head and distils only the classes seen so far. A multi-head model
    (an Avalanche ``MultiTaskModule`` such as :class:`~vsfcl.models.MultiHeadMLP`)
    distils every past task's head, called with that task's label.

    As in Avalanche 0.6.0's ``LwFPlugin``, the KL divergence is averaged over the
    minibatch and not multiplied by ``T^2``, so ``alpha`` values carry over.

    Parameters
    ----------
    alpha : float
        Weight of the distillation loss; non-negative.
    temperature : float
        Softmax temperature ``T``; positive.
    """

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0) -> None:
        super().__init__()
        if alpha < 0:
            raise ValueError(f"alpha={alpha} must be non-negative")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be positive")
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.previous_model: nn.Module | None = None
        # Output units trained so far, per task label (one key, 0, for a single head).
        self.seen_units: dict[int, set[int]] = {}
        self.last_penalty: Tensor | float = 0.0
        # Weights restored by load_state_dict, copied into a previous model at the next step.
        self._restored_weights: dict[str, Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Return the previous model's weights and the trained units (for checkpoints)."""
        weights = None if self.previous_model is None else dict(self.previous_model.state_dict())
        if weights is None and self._restored_weights is not None:
            weights = self._restored_weights
        return {
            "previous_weights": weights,
            "seen_units": {task: sorted(units) for task, units in self.seen_units.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state returned by :meth:`state_dict`. The previous model is rebuilt at the next step."""
        self.previous_model = None
        self._restored_weights = state["previous_weights"]
        self.seen_units = {int(task): set(units) for task, units in state["seen_units"].items()}

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self._restored_weights is not None:
            self.previous_model = self._frozen_copy(strategy.model)
            self.previous_model.load_state_dict(self._restored_weights)
            self._restored_weights = None
        if self.previous_model is None or self.alpha == 0.0:
            return
        penalty = self.alpha * self._distillation(strategy.model, strategy.mb_x, strategy.mb_output)
        strategy.loss = strategy.loss + penalty
        self.last_penalty = penalty.detach()

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model = strategy.model
        self.previous_model = self._frozen_copy(model)
        self._restored_weights = None
        labels, tasks = self._labels_of(strategy)
        multi_task = is_multi_task_module(model)
        for task in torch.unique(tasks).tolist() if multi_task else [0]:
            units = labels[tasks == task] if multi_task else labels
            self.seen_units.setdefault(int(task), set()).update(torch.unique(units).tolist())

    @staticmethod
    def _frozen_copy(model: nn.Module) -> nn.Module:
        copied = copy.deepcopy(model).eval()
        for parameter in copied.parameters():
            parameter.requires_grad_(False)
        return copied

    def _labels_of(self, strategy: Any) -> tuple[Tensor, Tensor]:
        data = getattr(strategy.experience, "tensors", None)
        if data is not None:
            return data.y.cpu(), data.t.cpu()
        dataset = strategy.experience.dataset
        return torch.as_tensor(list(dataset.targets)), torch.as_tensor(
            list(dataset.targets_task_labels)
        )

    def _distillation(self, model: nn.Module, x: Tensor, output: Tensor) -> Tensor:
        assert self.previous_model is not None
        total = torch.zeros((), device=x.device)
        multi_task = is_multi_task_module(model)
        for task, units in self.seen_units.items():
            index = torch.tensor(sorted(units), device=x.device)
            with torch.no_grad():
                old = self.previous_model(x, task) if multi_task else self.previous_model(x)
            new = model(x, task) if multi_task else output
            log_p = F.log_softmax(new[:, index] / self.temperature, dim=1)
            q = F.softmax(old[:, index] / self.temperature, dim=1)
            total = total + F.kl_div(log_p, q, reduction="batchmean")
        return total
