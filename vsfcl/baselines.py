"""Baseline plugins that need more than Avalanche 0.6.0's own: MAS on the fast tensors and LwF for multi-head MLPs.

SI comes straight from Avalanche (``SynapticIntelligencePlugin``) and EWC from
:mod:`vsfcl.ewc`.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import avalanche_forward, is_multi_task_module
from avalanche.training.plugins import MASPlugin
from avalanche.training.utils import zerolike_params_dict
from torch import Tensor, nn
from torch.nn import functional as F

from vsfcl.ewc import experience_batches

log = logging.getLogger(__name__)


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
            for name, gradient in zip(names, gradients):
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
    loss, where ``q_h`` and ``p_h`` are the temperature-``T`` softmax outputs of the model
    saved after experience ``k - 1`` and of the current model on the current inputs,
    over the output units of head ``h`` that past experiences trained. A single-head
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

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.previous_model is None or self.alpha == 0.0:
            return
        penalty = self.alpha * self._distillation(strategy.model, strategy.mb_x, strategy.mb_output)
        strategy.loss = strategy.loss + penalty
        self.last_penalty = penalty.detach()

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model = strategy.model
        self.previous_model = copy.deepcopy(model).eval()
        for parameter in self.previous_model.parameters():
            parameter.requires_grad_(False)
        labels, tasks = self._labels_of(strategy)
        multi_task = is_multi_task_module(model)
        for task in torch.unique(tasks).tolist() if multi_task else [0]:
            units = labels[tasks == task] if multi_task else labels
            self.seen_units.setdefault(int(task), set()).update(torch.unique(units).tolist())

    def _labels_of(self, strategy: Any) -> tuple[Tensor, Tensor]:
        data = getattr(strategy.experience, "tensors", None)
        if data is not None:
            return data.y.cpu(), data.t.cpu()
        dataset = strategy.experience.dataset
        return torch.as_tensor(list(dataset.targets)), torch.as_tensor(list(dataset.targets_task_labels))

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
