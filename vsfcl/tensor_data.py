"""The fast data path: Avalanche strategies that read minibatches from device tensors.

A stock Avalanche strategy reads every sample through ``AvalancheDataset.__getitem__``
and a ``DataLoader`` collate step. On 2 CPU cores this costs about a third of an epoch
of the 2x400 MLP on MNIST (see BENCHMARKS.md), and more with smaller models or a GPU.
Here each experience's samples stay as tensors on the run's device and minibatches
are taken by indexing. The strategies remain Avalanche strategies (same
hooks, same plugins, same evaluation); only ``make_train_dataloader`` and
``make_eval_dataloader`` change.

The tensors travel with the experience objects: :func:`to_avalanche` stores each
experience's :class:`~vsfcl.scenarios.ExperienceTensors` as ``experience.tensors``.
An experience without that attribute falls back to Avalanche's own loader.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.generic_scenario import CLScenario
from avalanche.benchmarks.scenarios.task_aware import with_task_labels
from avalanche.benchmarks.utils.classification_dataset import (
    _make_taskaware_tensor_classification_dataset,
)
from avalanche.training.supervised import JointTraining
from torch import Tensor

from vsfcl.scenarios import ExperienceTensors, TensorBenchmark

log = logging.getLogger(__name__)


def to_avalanche(benchmark: TensorBenchmark) -> CLScenario:
    """Wrap a tensor benchmark as an Avalanche scenario with train, valid and test streams.

    The Avalanche datasets hold CPU copies, so stock Avalanche code (for example
    ``EWCPlugin``'s importance pass) still works; each experience also carries its
    tensors as ``experience.tensors`` for the fast path.
    """
    datasets = {}
    for name, experiences in benchmark.streams.items():
        datasets[name] = [
            _make_taskaware_tensor_classification_dataset(
                data.x.cpu(), data.y.cpu(), task_labels=data.t.cpu().tolist(), targets=data.y.cpu()
            )
            for data in experiences
        ]
    scenario = with_task_labels(benchmark_from_datasets(**datasets))
    for name, experiences in benchmark.streams.items():
        stream = getattr(scenario, f"{name}_stream")
        for experience, data in zip(stream, experiences, strict=False):
            experience.tensors = data
    return scenario


class TensorLoader:
    """Minibatches ``[x, y, t]`` drawn by indexing tensors, reshuffled every epoch.

    Parameters
    ----------
    data : ExperienceTensors
        Samples, already on the device where the batches are wanted.
    batch_size : int
    shuffle : bool
        Draw a new permutation at every pass.
    generator : torch.Generator, optional
        Source of the permutations; a CPU generator so that runs are reproducible
        on any device.
    drop_last : bool
        Skip a final batch smaller than ``batch_size``.
    """

    def __init__(
        self,
        data: ExperienceTensors,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = len(self.data)
        if self.drop_last:
            return n // self.batch_size
        return (n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[Tensor]]:
        n = len(self.data)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.data.x.device)
        else:
            order = None
        for batch in range(len(self)):
            start = batch * self.batch_size
            stop = min(start + self.batch_size, n)
            if order is None:
                yield [self.data.x[start:stop], self.data.y[start:stop], self.data.t[start:stop]]
            else:
                index = order[start:stop]
                # index_select copied 128 rows of 784 floats in 54 us against 232 us for x[index]
                # (PyTorch 2.14.1, one thread of a 2-core AMD EPYC VM).
                yield [
                    self.data.x.index_select(0, index),
                    self.data.y.index_select(0, index),
                    self.data.t.index_select(0, index),
                ]


class TensorDataMixin:
    """Mixin that replaces an Avalanche strategy's data loaders with :class:`TensorLoader`.

    Put it before the strategy class in the bases, e.g.
    ``class FastNaive(TensorDataMixin, Naive)``, or use :func:`with_tensor_data`.
    """

    experience: Any
    device: torch.device
    train_mb_size: int
    eval_mb_size: int

    def __init__(self, *, loader_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.loader_generator = torch.Generator().manual_seed(loader_seed)
        self._device_tensors: dict[int, ExperienceTensors] = {}

    def _tensors_of(self, experience: Any) -> ExperienceTensors | None:
        data = getattr(experience, "tensors", None)
        if data is None:
            return None
        key = id(data)
        if key not in self._device_tensors:
            self._device_tensors[key] = data.to(self.device)
        return self._device_tensors[key]

    def make_train_dataloader(self, shuffle: bool = True, **kwargs: Any) -> None:
        if isinstance(self, JointTraining):
            parts = [self._tensors_of(e) for e in self._experiences]
            data = None if any(p is None for p in parts) else ExperienceTensors.concatenate(parts)
        else:
            data = self._tensors_of(self.experience)
        if data is None:
            log.warning("experience has no tensors; using Avalanche's per-sample loader")
            super().make_train_dataloader(shuffle=shuffle, **kwargs)  # type: ignore[misc]
            return
        self.dataloader = TensorLoader(
            data, self.train_mb_size, shuffle=shuffle, generator=self.loader_generator
        )

    def make_eval_dataloader(self, **kwargs: Any) -> None:
        data = self._tensors_of(self.experience)
        if data is None:
            super().make_eval_dataloader(**kwargs)  # type: ignore[misc]
            return
        self.dataloader = TensorLoader(data, self.eval_mb_size, shuffle=False)


_FAST_CLASSES: dict[type, type] = {}


def with_tensor_data(strategy_class: type) -> type:
    """Return a subclass of ``strategy_class`` that uses the fast tensor data path."""
    if strategy_class not in _FAST_CLASSES:
        _FAST_CLASSES[strategy_class] = type(
            f"Tensor{strategy_class.__name__}", (TensorDataMixin, strategy_class), {}
        )
    return _FAST_CLASSES[strategy_class]
