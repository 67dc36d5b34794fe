"""Strategies of the training command: Avalanche strategies plus regularization plugins.

Every sequential method is Avalanche's ``Naive`` strategy (plain fine-tuning) with a
plugin: ``EWCPlugin`` for EWC and online EWC, :class:`~vsfcl.plugin.FlatnessPlugin`
for ours. ``joint`` is Avalanche's ``JointTraining`` on the whole stream at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EWCPlugin
from avalanche.training.plugins.evaluation import EvaluationPlugin
from avalanche.training.supervised import JointTraining, Naive
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from vsfcl.plugin import FlatnessPlugin
from vsfcl.tensor_data import with_tensor_data

STRATEGIES = ("naive", "joint", "ewc", "online_ewc", "flatness")


@dataclass
class BuiltStrategy:
    """A ready strategy and the plugin that implements the method, if any."""

    strategy: SupervisedTemplate
    method_plugin: SupervisedPlugin | None
    joint: bool


def _number(options: Mapping[str, Any], key: str, minimum: float = 0.0) -> float:
    value = options.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"strategy.{key}={value!r} is invalid; it must be a finite number >= {minimum:g}")
    if value < minimum:
        raise ValueError(f"strategy.{key}={value!r} is out of range; it must be >= {minimum:g}")
    return float(value)


def build_method_plugin(name: str, options: Mapping[str, Any]) -> SupervisedPlugin | None:
    """Create the plugin of a strategy from its config options (None for naive and joint)."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy {name!r} is unknown; choose one of {', '.join(STRATEGIES)}")
    if name in ("naive", "joint"):
        return None
    if name == "ewc":
        return EWCPlugin(ewc_lambda=_number(options, "ewc_lambda"), mode="separate")
    if name == "online_ewc":
        decay = _number(options, "decay_factor")
        if decay > 1.0:
            raise ValueError(f"strategy.decay_factor={decay} is out of range; it must be in [0, 1]")
        return EWCPlugin(ewc_lambda=_number(options, "ewc_lambda"), mode="online", decay_factor=decay)

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
    )


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
    then Avalanche's evaluator.
    """
    if train_epochs < 1:
        raise ValueError(f"train_epochs={train_epochs} must be at least 1")
    if batch_size < 1 or eval_batch_size < 1:
        raise ValueError(
            f"batch_size={batch_size} and eval_batch_size={eval_batch_size} must be at least 1"
        )
    method_plugin = build_method_plugin(name, options)
    plugins = [*extra_plugins, *([method_plugin] if method_plugin else []), *final_plugins]
    joint = name == "joint"
    base = JointTraining if joint else Naive
    kwargs: dict[str, Any] = {}
    if fast_data:
        base = with_tensor_data(base)
        kwargs["loader_seed"] = loader_seed
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
