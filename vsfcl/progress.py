"""Small Avalanche plugins for the training command: a progress bar and a clock."""

from __future__ import annotations

import time
from typing import Any

from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metric_definitions import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from tqdm.auto import tqdm


class ProgressBar(SupervisedPlugin):
    """One tqdm bar per training experience, over all its iterations and epochs.

    The bar shows the current minibatch loss and, when a plugin exposes
    ``last_penalty``, the regularization penalty.
    """

    def __init__(self, penalty_source: Any = None, disable: bool = False) -> None:
        super().__init__()
        self.penalty_source = penalty_source
        self.disable = disable
        self._bar: tqdm | None = None

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        total = strategy.train_epochs * len(strategy.dataloader)
        experience = getattr(strategy.experience, "current_experience", "joint")
        self._bar = tqdm(
            total=total, desc=f"experience {experience}", unit="it", disable=self.disable
        )

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self._bar is None:
            return
        self._bar.update(1)
        if self._bar.n % 20 == 0:
            postfix = {"loss": f"{strategy.loss.item():.4f}"}
            if self.penalty_source is not None:
                postfix["penalty"] = f"{self.penalty_source.last_penalty:.4f}"
            self._bar.set_postfix(postfix, refresh=False)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the open bar, if any, so that later output starts on its own line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class ConsolidationClock:
    """Times what plugins do after each experience (EWC's Fisher pass, PCA, profiles).

    ``start`` must be the first plugin of the strategy and ``stop`` the last one
    before the evaluator, so the interval covers every other plugin's
    ``after_training_exp``.
    """

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._started = 0.0
        clock = self

        class _Start(SupervisedPlugin):
            def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
                clock._started = time.perf_counter()

        class _Stop(SupervisedPlugin):
            def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
                clock.seconds.append(time.perf_counter() - clock._started)

        self.start = _Start()
        self.stop = _Stop()


class PenaltyMetric(PluginMetric[float]):
    """Mean regularization penalty per training epoch, logged as ``flatness/penalty``.

    The value comes from the first plugin of the strategy that exposes ``last_penalty``
    (the :class:`~vsfcl.plugin.FlatnessPlugin`); it is looked up at each epoch because
    the evaluator is built before the strategy's plugins.
    """

    def __init__(self) -> None:
        super().__init__()
        self._total = 0.0
        self._count = 0
        self._source: Any = None

    def result(self) -> float | None:
        return self._total / self._count if self._count else None

    def reset(self) -> None:
        self._total = 0.0
        self._count = 0

    def before_training_epoch(self, strategy: Any) -> None:
        self.reset()
        self._source = next((p for p in strategy.plugins if hasattr(p, "last_penalty")), None)

    def after_training_iteration(self, strategy: Any) -> None:
        if self._source is not None:
            self._total += float(self._source.last_penalty)
            self._count += 1

    def after_training_epoch(self, strategy: Any) -> list[MetricValue]:
        value = self.result()
        if value is None:
            return []
        return [MetricValue(self, "flatness/penalty", value, strategy.clock.train_iterations)]

    def __str__(self) -> str:
        return "flatness/penalty"
