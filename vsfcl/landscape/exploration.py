"""Minibatch training into the exploration phase and through the snapshot window.

Feng and Tu (PNAS 118, e2015617118, 2021) describe two phases of SGD on MNIST, a fast
phase and then an exploration phase. In the exploration phase the training error is
near zero, while the loss keeps falling slowly and the test error still improves. The weight trajectory is
analysed over a window inside the exploration phase. Here the exploration phase is
declared reached once the full training-set error falls to a threshold; that
criterion is a choice of this package, configurable, and its outcome is reported.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassificationData:
    """Flattened inputs and labels of the training and test sets, on one device.

    Attributes
    ----------
    train_inputs : Tensor of shape (n_train, n_features), float32
    train_targets : Tensor of shape (n_train,), int64
    test_inputs : Tensor of shape (n_test, n_features), float32
    test_targets : Tensor of shape (n_test,), int64
    """

    train_inputs: Tensor
    train_targets: Tensor
    test_inputs: Tensor
    test_targets: Tensor


@dataclass(frozen=True)
class ExplorationCriterion:
    """When training counts as being in the exploration phase.

    Attributes
    ----------
    max_train_error : float
        Full training-set error rate (fraction in [0, 1]) at or below which the
        exploration phase is reached.
    min_epochs : int
        Epochs trained before the criterion is checked.
    max_epochs : int
        Epochs after which training stops waiting; the window then starts anyway and
        the outcome records that the criterion was not met.
    """

    max_train_error: float = 0.001
    min_epochs: int = 1
    max_epochs: int = 200

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_train_error <= 1.0:
            raise ValueError(f"max_train_error={self.max_train_error} must be a fraction in [0, 1]")
        if not 0 <= self.min_epochs <= self.max_epochs:
            raise ValueError(
                f"min_epochs={self.min_epochs} and max_epochs={self.max_epochs} need "
                "0 <= min_epochs <= max_epochs"
            )


@dataclass(frozen=True)
class EpochRecord:
    """Full-set metrics after one epoch; errors are fractions, losses mean cross-entropy."""

    epoch: int
    train_loss: float
    train_error: float
    test_loss: float
    test_error: float
    seconds: float


@dataclass
class TrainingHistory:
    """Per-epoch records and the exploration-phase outcome."""

    records: list[EpochRecord] = field(default_factory=list)
    exploration_reached: bool = False
    exploration_epoch: int | None = None
    iterations: int = 0


def evaluate(
    model: nn.Module, inputs: Tensor, targets: Tensor, chunk_size: int = 8192
) -> tuple[float, float]:
    """Return the mean cross-entropy and the error rate of ``model`` on a whole set."""
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    errors = 0
    with torch.no_grad():
        for start in range(0, inputs.shape[0], chunk_size):
            logits = model(inputs[start : start + chunk_size])
            y = targets[start : start + chunk_size]
            loss_sum += float(F.cross_entropy(logits, y, reduction="none").sum(dtype=torch.float64))
            errors += int((logits.argmax(dim=1) != y).sum())
    model.train(was_training)
    return loss_sum / inputs.shape[0], errors / inputs.shape[0]


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: Tensor,
    targets: Tensor,
    batch_size: int,
    generator: torch.Generator,
    first_iteration: int = 0,
    after_step: Callable[[int], None] | None = None,
) -> int:
    """Run one epoch of minibatch training over a random permutation of the data.

    Every minibatch has exactly ``batch_size`` samples: the last, incomplete one is
    dropped, so the gradient noise is the same at every step.

    Parameters
    ----------
    after_step : callable, optional
        Called with the global iteration number (counting from 1) after each update.

    Returns
    -------
    int
        Global iteration count after the epoch.
    """
    model.train()
    order = torch.randperm(inputs.shape[0], generator=generator).to(inputs.device)
    iteration = first_iteration
    for start in range(0, inputs.shape[0] - batch_size + 1, batch_size):
        batch = order[start : start + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs[batch]), targets[batch])
        loss.backward()
        optimizer.step()
        iteration += 1
        if after_step is not None:
            after_step(iteration)
    return iteration


def _record_epoch(
    history: TrainingHistory, model: nn.Module, data: ClassificationData, epoch: int, seconds: float
) -> EpochRecord:
    train_loss, train_error = evaluate(model, data.train_inputs, data.train_targets)
    test_loss, test_error = evaluate(model, data.test_inputs, data.test_targets)
    record = EpochRecord(epoch, train_loss, train_error, test_loss, test_error, seconds)
    history.records.append(record)
    log.info(
        "epoch %d: train loss %.5f, train error %.4f, test loss %.4f, test error %.4f (%.1f s)",
        epoch,
        train_loss,
        train_error,
        test_loss,
        test_error,
        seconds,
    )
    return record


def train_to_exploration(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: ClassificationData,
    batch_size: int,
    criterion: ExplorationCriterion,
    generator: torch.Generator,
) -> TrainingHistory:
    """Train epoch by epoch until the exploration criterion is met or ``max_epochs`` pass."""
    history = TrainingHistory()
    for epoch in range(1, criterion.max_epochs + 1):
        start = time.perf_counter()
        history.iterations = train_epoch(
            model,
            optimizer,
            data.train_inputs,
            data.train_targets,
            batch_size,
            generator,
            first_iteration=history.iterations,
        )
        record = _record_epoch(history, model, data, epoch, time.perf_counter() - start)
        if epoch >= criterion.min_epochs and record.train_error <= criterion.max_train_error:
            history.exploration_reached = True
            history.exploration_epoch = epoch
            log.info(
                "Exploration phase reached at epoch %d: train error %.4f <= %.4f",
                epoch,
                record.train_error,
                criterion.max_train_error,
            )
            return history
    if criterion.max_epochs == 0:
        return history
    log.warning(
        "The exploration criterion (train error <= %.4f) was not met within %d epochs; "
        "the snapshot window starts anyway. Raise exploration.max_epochs or the threshold.",
        criterion.max_train_error,
        criterion.max_epochs,
    )
    return history


def train_window(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: ClassificationData,
    batch_size: int,
    n_epochs: int,
    snapshot_interval: int,
    record_snapshot: Callable[[int], None],
    history: TrainingHistory,
    generator: torch.Generator,
) -> None:
    """Keep training for ``n_epochs`` and take a snapshot every ``snapshot_interval`` iterations.

    Iterations are counted from the start of the window, so the first snapshot follows
    its ``snapshot_interval``-th update.
    """
    window_start = history.iterations

    def after_step(iteration: int) -> None:
        if (iteration - window_start) % snapshot_interval == 0:
            record_snapshot(iteration)

    first_epoch = len(history.records) + 1
    for epoch in range(first_epoch, first_epoch + n_epochs):
        start = time.perf_counter()
        history.iterations = train_epoch(
            model,
            optimizer,
            data.train_inputs,
            data.train_targets,
            batch_size,
            generator,
            first_iteration=history.iterations,
            after_step=after_step,
        )
        _record_epoch(history, model, data, epoch, time.perf_counter() - start)
