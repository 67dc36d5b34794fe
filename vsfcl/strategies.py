"""Strategies of the training command: Avalanche strategies plus regularization plugins.

Every sequential method is Avalanche's ``Naive`` strategy (plain fine-tuning) with a
plugin: :class:`~vsfcl.ewc.EWCPlugin` for EWC and online EWC,
:class:`~vsfcl.baselines.CopyingSynapticIntelligencePlugin` (Avalanche's, fixed on CPU)
for SI, :class:`~vsfcl.baselines.TensorMASPlugin` for MAS,
:class:`~vsfcl.baselines.LwFPlugin` for LwF and
:class:`~vsfcl.plugin.FlatnessPlugin` for ours. ``joint`` is Avalanche's
``JointTraining`` on the whole stream at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metric_definitions import PluginMetric
from avalanche.logging import BaseLogger
from avalanche.training.plugins import EWCPlugin as AvalancheEWCPlugin
from avalanche.training.plugins.evaluation import EvaluationPlugin
from avalanche.training.supervised import JointTraining, Naive
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from vsfcl.baselines import CopyingSynapticIntelligencePlugin, LwFPlugin, TensorMASPlugin
from vsfcl.ewc import FISHER_ESTIMATES, EWCPlugin
from vsfcl.plugin import FlatnessPlugin
from vsfcl.tensor_data import with_tensor_data

# SI is named in full because "si" is kept as the example of an unknown name in the tests.
STRATEGIES = (
    "naive",
    "joint",
    "ewc",
    "online_ewc",
    "synaptic_intelligence",
    "mas",
    "lwf",
    "flatness",
)


@dataclass
class BuiltStrategy:
    """A ready strategy and the plugin that implements the method, if any."""

    strategy: SupervisedTemplate
    method_plugin: SupervisedPlugin | None
    joint: bool


def _number(options: Mapping[str, Any], key: str, minimum: float = 0.0) -> float:
    value = options.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(
            f"strategy.{key}={value!r} is invalid; it must be a finite number >= {minimum:g}"
        )
    if value < minimum:
        raise ValueError(f"strategy.{key}={value!r} is out of range; it must be >= {minimum:g}")
    return float(value)


def _fraction(options: Mapping[str, Any], key: str) -> float:
    value = _number(options, key)
    if value > 1.0:
        raise ValueError(f"strategy.{key}={value} is out of range; it must be in [0, 1]")
    return value


def _fisher(options: Mapping[str, Any]) -> str:
    fisher = options.get("fisher", "batched")
    if fisher not in FISHER_ESTIMATES:
        raise ValueError(
            f"strategy.fisher={fisher!r} is invalid; choose one of {', '.join(FISHER_ESTIMATES)}"
        )
    return fisher


def _optional_count(options: Mapping[str, Any], key: str) -> int | None:
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"strategy.{key}={value!r} is invalid; it must be a positive integer or null"
        )
    return value


def build_method_plugin(
    name: str, options: Mapping[str, Any], seed: int = 0
) -> SupervisedPlugin | None:
    """Create the plugin of a strategy from its config options (None for naive and joint).

    ``seed`` seeds the labels drawn by EWC's ``fisher=sampled``.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy {name!r} is unknown; choose one of {', '.join(STRATEGIES)}")
    if name in ("naive", "joint"):
        return None
    if name in ("ewc", "online_ewc"):
        online = name == "online_ewc"
        implementation = options.get("implementation", "vsfcl")
        if implementation == "avalanche":
            # Avalanche 0.6.0's own plugin: batched Fisher through its per-sample loader.
            return AvalancheEWCPlugin(
                ewc_lambda=_number(options, "ewc_lambda"),
                mode="online" if online else "separate",
                decay_factor=_fraction(options, "decay_factor") if online else None,
            )
        if implementation != "vsfcl":
            raise ValueError(
                f"strategy.implementation={implementation!r} is invalid; use vsfcl (fast, every "
                "Fisher estimate) or avalanche (Avalanche's EWCPlugin, batched Fisher only)"
            )
        return EWCPlugin(
            ewc_lambda=_number(options, "ewc_lambda"),
            fisher=_fisher(options),  # type: ignore[arg-type]
            mode="online" if online else "separate",
            decay_factor=_fraction(options, "decay_factor") if online else 1.0,
            fisher_samples=_optional_count(options, "fisher_samples"),
            seed=seed,
        )
    if name == "synaptic_intelligence":
        return CopyingSynapticIntelligencePlugin(
            si_lambda=_number(options, "si_lambda"), eps=_number(options, "eps")
        )
    if name == "mas":
        return TensorMASPlugin(
            lambda_reg=_number(options, "mas_lambda"), alpha=_fraction(options, "alpha")
        )
    if name == "lwf":
        temperature = _number(options, "temperature")
        if temperature == 0.0:
            raise ValueError("strategy.temperature=0 is out of range; it must be > 0")
        return LwFPlugin(alpha=_number(options, "alpha"), temperature=temperature)

    parameters: Sequence[str] | None = options.get("parameters")
    return FlatnessPlugin(
        strength=_number(options, "strength"),
        n_directions=int(options["n_directions"]),
        stiffness=options["stiffness"],
        n_snapshots=int(options["n_snapshots"]),
        window_fraction=float(options["window_fraction"]),
        parameters=None if parameters is None else list(parameters),
        psi=_number(options, "psi"),
        profile_samples=int(options["profile_samples"]),
        profile_max_offset=_number(options, "profile_max_offset"),
        profile_rtol=_number(options, "profile_rtol"),
        profile_initial_step=_number(options, "profile_initial_step"),
        update=options.get("update", "gradient"),
        remove_drift=options.get("remove_drift", False) is True,
        trajectory=options.get("trajectory", "training"),
        probe_lr=float(options.get("probe_lr", 0.01)),
        probe_interval=int(options.get("probe_interval", 5)),
        max_directions=(
            None if options.get("max_directions") is None else int(options["max_directions"])
        ),
    )


# Callbacks that run several times per minibatch and that Avalanche 0.6.0's built-in
# metrics (subclasses of PluginMetric) do not override.
_PER_MINIBATCH_CALLBACKS = (
    "before_forward",
    "after_forward",
    "before_backward",
    "after_backward",
    "before_update",
    "after_update",
    "before_eval_forward",
    "after_eval_forward",
)


def _do_nothing(strategy: Any, **kwargs: Any) -> None:
    return None


def skip_idle_evaluator_callbacks(evaluator: EvaluationPlugin) -> list[str]:
    """Turn off the evaluator's per-minibatch callbacks that no metric or logger uses; return their names.

    Avalanche's ``EvaluationPlugin`` handles every callback by copying the experience in
    logging mode and polling each metric and logger, several times per minibatch,
    even when none of them acts on that callback. A callback is skipped only when
    every metric inherits ``PluginMetric``'s empty method for it and every logger keeps
    ``BaseLogger.log_metrics`` and has no method of that name, so no metric value or
    log line changes.
    """
    skipped = []
    for callback in _PER_MINIBATCH_CALLBACKS:
        base_method = getattr(PluginMetric, callback, None)
        metrics_idle = all(
            isinstance(metric, PluginMetric)
            and getattr(type(metric), callback, None) is base_method
            for metric in evaluator.metrics
        )
        loggers_idle = all(
            type(logger).log_metrics is BaseLogger.log_metrics and not hasattr(logger, callback)
            for logger in evaluator.loggers
        )
        if metrics_idle and loggers_idle:
            setattr(evaluator, callback, _do_nothing)
            skipped.append(callback)
    return skipped


def build_strategy(
    name: str,
    options: Mapping[str, Any],
    model: nn.Module,
    make_optimizer: Callable[..., torch.optim.Optimizer],
    evaluator: EvaluationPlugin,
    extra_plugins: Sequence[SupervisedPlugin],
    final_plugins: Sequence[SupervisedPlugin],
    train_epochs: int,
    batch_size: int,
    eval_batch_size: int,
    device: torch.device,
    fast_data: bool = True,
    loader_seed: int = 0,
) -> BuiltStrategy:
    """Assemble an Avalanche strategy for ``name``.

    Plugins run in the order ``extra_plugins``, the method's plugin, ``final_plugins``,
    then Avalanche's evaluator. With ``fast_data``, the evaluator's idle per-minibatch
    callbacks are also skipped (:func:`skip_idle_evaluator_callbacks`).
    """
    if train_epochs < 1:
        raise ValueError(f"train_epochs={train_epochs} must be at least 1")
    if batch_size < 1 or eval_batch_size < 1:
        raise ValueError(
            f"batch_size={batch_size} and eval_batch_size={eval_batch_size} must be at least 1"
        )
    method_plugin = build_method_plugin(name, options, seed=loader_seed)
    plugins = [*extra_plugins, *([method_plugin] if method_plugin else []), *final_plugins]
    joint = name == "joint"
    base = JointTraining if joint else Naive
    kwargs: dict[str, Any] = {}
    if fast_data:
        base = with_tensor_data(base)
        kwargs["loader_seed"] = loader_seed
        skip_idle_evaluator_callbacks(evaluator)
    strategy = base(
        model=model,
        optimizer=make_optimizer(params=model.parameters()),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=batch_size,
        train_epochs=train_epochs,
        eval_mb_size=eval_batch_size,
        device=device,
        plugins=plugins,
        evaluator=evaluator,
        eval_every=-1,
        **kwargs,
    )
    return BuiltStrategy(strategy=strategy, method_plugin=method_plugin, joint=joint)
