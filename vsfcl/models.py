"""Fully connected networks for flattened MNIST images.

Layers are named ``features.fc1``, ``features.fc2``, ... so that a parameter subset
can be chosen by name: in a network with two hidden layers,
``features.fc2.weight`` is the hidden-to-hidden weight matrix.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from avalanche.models import MultiTaskModule
from torch import Tensor, nn

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def _trunk(input_size: int, hidden_sizes: Sequence[int], activation: str) -> nn.Sequential:
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"activation={activation!r} is not supported; use one of {sorted(_ACTIVATIONS)}"
        )
    if input_size < 1:
        raise ValueError(f"input_size={input_size} must be at least 1")
    for size in hidden_sizes:
        if int(size) < 1:
            raise ValueError(
                f"hidden_sizes={list(hidden_sizes)} contains {size}; every hidden size "
                "must be at least 1"
            )
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width = input_size
    for depth, size in enumerate(hidden_sizes, start=1):
        layers[f"fc{depth}"] = nn.Linear(width, int(size))
        layers[f"act{depth}"] = _ACTIVATIONS[activation]()
        width = int(size)
    return nn.Sequential(layers)


class MLP(nn.Module):
    """Single-head MLP: flatten, hidden layers with an activation, linear output.

    Parameters
    ----------
    input_size : int
        Number of input features (784 for MNIST).
    hidden_sizes : sequence of int
        Width of each hidden layer; an empty sequence gives a linear model.
    n_classes : int
        Number of output logits.
    activation : {"relu", "tanh", "gelu"}
    """

    def __init__(
        self,
        input_size: int = 784,
        hidden_sizes: Sequence[int] = (400, 400),
        n_classes: int = 10,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes={n_classes} must be at least 1")
        self.features = _trunk(input_size, hidden_sizes, activation)
        width = int(hidden_sizes[-1]) if len(hidden_sizes) else input_size
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.flatten(start_dim=1)))


class MultiHeadMLP(MultiTaskModule):
    """MLP with a shared trunk and one output head per task label.

    Every head is created up front, so the parameter set does not change between
    experiences and a regularizer can address it by name. The output of sample ``b``
    is the head selected by ``task_labels[b]``.

    Parameters
    ----------
    input_size, hidden_sizes, activation
        As in :class:`MLP`.
    n_classes : int
        Logits per head (2 for task-incremental split MNIST).
    n_heads : int
        Number of task labels the model accepts, ``0 .. n_heads - 1``.
    """

    def __init__(
        self,
        input_size: int = 784,
        hidden_sizes: Sequence[int] = (400, 400),
        n_classes: int = 2,
        n_heads: int = 5,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes={n_classes} must be at least 1")
        if n_heads < 1:
            raise ValueError(f"n_heads={n_heads} must be at least 1")
        self.features = _trunk(input_size, hidden_sizes, activation)
        width = int(hidden_sizes[-1]) if len(hidden_sizes) else input_size
        self.heads = nn.ModuleList(nn.Linear(width, n_classes) for _ in range(n_heads))
        self.max_class_label = n_classes

    def adaptation(self, experience: Any) -> None:
        # The heads are fixed, so adaptation only records the task labels seen.
        self.known_train_tasks_labels |= set(getattr(experience, "task_labels", []))

    def forward(self, x: Tensor, task_labels: Tensor | int | None = None) -> Tensor:
        features = self.features(x.flatten(start_dim=1))
        if task_labels is None:
            raise ValueError("MultiHeadMLP needs task labels to choose an output head")
        if isinstance(task_labels, int):
            return self._head(task_labels)(features)
        # Computing every head and gathering keeps the batch in one piece; heads are small.
        all_heads = torch.stack([head(features) for head in self.heads])  # (n_heads, B, C)
        rows = torch.arange(features.shape[0], device=features.device)
        return all_heads[task_labels.long(), rows]

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        return self._head(task_label)(self.features(x.flatten(start_dim=1)))

    def _head(self, task_label: int) -> nn.Module:
        if not 0 <= task_label < len(self.heads):
            raise ValueError(
                f"task label {task_label} has no head; the model has {len(self.heads)} "
                "heads, so set model.n_heads to the number of experiences"
            )
        return self.heads[task_label]


def build_mlp(
    hidden_sizes: Sequence[int] = (400, 400),
    n_classes: int = 10,
    n_heads: int = 1,
    input_size: int = 784,
    activation: str = "relu",
) -> nn.Module:
    """Build an :class:`MLP` for one head or a :class:`MultiHeadMLP` for several."""
    if n_heads == 1:
        return MLP(input_size, hidden_sizes, n_classes, activation)
    return MultiHeadMLP(input_size, hidden_sizes, n_classes, n_heads, activation)
