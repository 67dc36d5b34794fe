"""Sequential-task MNIST benchmarks: split MNIST in three scenarios and permuted MNIST.

Each benchmark is first built as plain tensors, one :class:`ExperienceTensors` per
experience and stream, and then wrapped as an Avalanche ``CLScenario`` with the
streams ``train``, ``valid`` and ``test``. The ``valid`` stream is a held-out part of
each experience's training data, so that regularization strengths can be tuned
without touching the test set.

Scenarios (van de Ven and Tolias, 2019; Hsu et al., 2018):

- ``task``: split MNIST, one task label and one output head per experience; labels are
  the position of the digit in its pair (0 or 1).
- ``domain``: split MNIST, no task labels, one shared 2-way head; labels as in ``task``.
- ``class``: split MNIST, no task labels, one 10-way head; labels are the digits.
- permuted MNIST: each experience applies its own fixed pixel permutation to every
  image; one shared 10-way head, no task labels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vsfcl.data.mnist import MnistArrays

log = logging.getLogger(__name__)

Scenario = Literal["task", "domain", "class"]
STREAMS = ("train", "valid", "test")


@dataclass(frozen=True)
class ExperienceTensors:
    """The samples of one experience in one stream.

    Attributes
    ----------
    x : Tensor of shape (n_samples, 784), float32 in [0, 1]
    y : Tensor of shape (n_samples,), int64 class labels
    t : Tensor of shape (n_samples,), int64 task labels
    """

    x: Tensor
    y: Tensor
    t: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device | str) -> ExperienceTensors:
        return ExperienceTensors(self.x.to(device), self.y.to(device), self.t.to(device))

    @staticmethod
    def concatenate(parts: Sequence[ExperienceTensors]) -> ExperienceTensors:
        return ExperienceTensors(
            torch.cat([p.x for p in parts]),
            torch.cat([p.y for p in parts]),
            torch.cat([p.t for p in parts]),
        )


@dataclass(frozen=True)
class TensorBenchmark:
    """A benchmark as tensors, with what a model needs to know about its outputs.

    Attributes
    ----------
    name : str
        ``split_mnist/<scenario>`` or ``permuted_mnist``.
    streams : dict of str to list of ExperienceTensors
        Keys ``train``, ``valid`` and ``test``; one entry per experience.
    n_classes : int
        Logits per output head.
    n_heads : int
        Output heads the model needs (the number of task labels).
    """

    name: str
    streams: dict[str, list[ExperienceTensors]]
    n_classes: int
    n_heads: int

    @property
    def n_experiences(self) -> int:
        return len(self.streams["train"])

    def to(self, device: torch.device | str) -> TensorBenchmark:
        moved = {name: [e.to(device) for e in exps] for name, exps in self.streams.items()}
        return TensorBenchmark(self.name, moved, self.n_classes, self.n_heads)


def _flatten_images(images: Tensor) -> Tensor:
    return images.reshape(images.shape[0], -1).to(torch.float32) / 255.0


def _subsample(n: int, limit: int | None, generator: torch.Generator) -> Tensor:
    """Return sorted indices of at most ``limit`` of ``n`` samples, drawn without replacement."""
    if limit is None or limit >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:limit].sort().values


def _split_valid(
    data: ExperienceTensors, valid_fraction: float, generator: torch.Generator
) -> tuple[ExperienceTensors, ExperienceTensors]:
    n = len(data)
    n_valid = int(round(valid_fraction * n))
    order = torch.randperm(n, generator=generator)
    valid_index, train_index = order[:n_valid].sort().values, order[n_valid:].sort().values

    def take(index: Tensor) -> ExperienceTensors:
        return ExperienceTensors(data.x[index], data.y[index], data.t[index])

    return take(train_index), take(valid_index)


def _check_common(valid_fraction: float, train_limit: int | None, test_limit: int | None) -> None:
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(
            f"valid_fraction={valid_fraction} is out of range; it must be in [0, 1), "
            "for example 0.1 to hold out 10% of each experience's training data"
        )
    for name, value in (("train_samples", train_limit), ("test_samples", test_limit)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be a positive sample count or null for all")


def split_mnist(
    mnist: MnistArrays,
    scenario: Scenario = "task",
    n_experiences: int = 5,
    class_order: Sequence[int] | None = None,
    valid_fraction: float = 0.1,
    seed: int = 0,
    train_samples: int | None = None,
    test_samples: int | None = None,
) -> TensorBenchmark:
    """Split MNIST: the ten digits divided into ``n_experiences`` groups of equal size.

    Parameters
    ----------
    mnist : MnistArrays
    scenario : {"task", "domain", "class"}
    n_experiences : int
        Must divide 10; the default 5 gives the digit pairs (0, 1), (2, 3), ...
    class_order : sequence of int, optional
        Order of the digits before splitting; defaults to 0..9.
    valid_fraction : float
        Fraction of each experience's training samples held out as ``valid``, in [0, 1).
    seed : int
        Seeds the validation split and any subsampling.
    train_samples, test_samples : int, optional
        Keep at most this many training (before the validation split) and test
        samples per experience, for quick runs.
    """
    if scenario not in ("task", "domain", "class"):
        raise ValueError(
            f"scenario={scenario!r} is not a split MNIST scenario; use 'task', 'domain' or 'class'"
        )
    if n_experiences < 1 or 10 % n_experiences != 0:
        raise ValueError(
            f"n_experiences={n_experiences} does not divide the 10 MNIST classes; use 1, 2, 5 or 10"
        )
    _check_common(valid_fraction, train_samples, test_samples)
    order = list(range(10)) if class_order is None else [int(c) for c in class_order]
    if sorted(order) != list(range(10)):
        raise ValueError(f"class_order={order} must be a permutation of the digits 0..9")

    per_experience = 10 // n_experiences
    generator = torch.Generator().manual_seed(seed)
    # Map each digit to its experience and to its position inside that experience.
    digit_to_experience = torch.empty(10, dtype=torch.long)
    digit_to_position = torch.empty(10, dtype=torch.long)
    for position, digit in enumerate(order):
        digit_to_experience[digit] = position // per_experience
        digit_to_position[digit] = position % per_experience

    sources = {
        "train": (mnist.train_images, mnist.train_labels, train_samples),
        "test": (mnist.test_images, mnist.test_labels, test_samples),
    }
    streams: dict[str, list[ExperienceTensors]] = {name: [] for name in STREAMS}
    for experience in range(n_experiences):
        for source, (images, labels, limit) in sources.items():
            index = torch.nonzero(digit_to_experience[labels] == experience).flatten()
            index = index[_subsample(index.numel(), limit, generator)]
            digits = labels[index]
            y = digits if scenario == "class" else digit_to_position[digits]
            task = experience if scenario == "task" else 0
            data = ExperienceTensors(
                _flatten_images(images[index]), y.clone(), torch.full_like(y, task)
            )
            if source == "train":
                train, valid = _split_valid(data, valid_fraction, generator)
                streams["train"].append(train)
                streams["valid"].append(valid)
            else:
                streams["test"].append(data)

    n_classes = 10 if scenario == "class" else per_experience
    n_heads = n_experiences if scenario == "task" else 1
    return TensorBenchmark(f"split_mnist/{scenario}", streams, n_classes, n_heads)


def permuted_mnist(
    mnist: MnistArrays,
    n_experiences: int = 10,
    valid_fraction: float = 0.1,
    seed: int = 0,
    train_samples: int | None = None,
    test_samples: int | None = None,
) -> TensorBenchmark:
    """Permuted MNIST: every experience is all of MNIST under its own pixel permutation.

    Parameters
    ----------
    mnist : MnistArrays
    n_experiences : int
        Number of permutations, at least 1. Every experience is permuted, the first
        included, and the permutations are drawn from ``seed``.
    valid_fraction, seed, train_samples, test_samples
        As in :func:`split_mnist`.
    """
    if n_experiences < 1:
        raise ValueError(f"n_experiences={n_experiences} must be at least 1")
    _check_common(valid_fraction, train_samples, test_samples)
    generator = torch.Generator().manual_seed(seed)
    train_x = _flatten_images(mnist.train_images)
    test_x = _flatten_images(mnist.test_images)

    streams: dict[str, list[ExperienceTensors]] = {name: [] for name in STREAMS}
    for _ in range(n_experiences):
        permutation = torch.randperm(train_x.shape[1], generator=generator)
        train_index = _subsample(train_x.shape[0], train_samples, generator)
        test_index = _subsample(test_x.shape[0], test_samples, generator)
        train_y = mnist.train_labels[train_index]
        test_y = mnist.test_labels[test_index]
        data = ExperienceTensors(
            train_x[train_index][:, permutation], train_y, torch.zeros_like(train_y)
        )
        train, valid = _split_valid(data, valid_fraction, generator)
        streams["train"].append(train)
        streams["valid"].append(valid)
        streams["test"].append(
            ExperienceTensors(test_x[test_index][:, permutation], test_y, torch.zeros_like(test_y))
        )
    return TensorBenchmark("permuted_mnist", streams, n_classes=10, n_heads=1)
