"""Checkpoints of a training run, written after every experience so that a run can resume.

A checkpoint is one ``torch.save`` file that contains only tensors, dicts, lists,
tuples, strings, numbers, booleans and None, so it loads with
``torch.load(..., weights_only=True)``, which never runs code from the file. It
contains everything a resumed run needs to continue exactly as an uninterrupted one:

- the model, the optimizer and Avalanche's ``strategy.clock`` counters;
- the state the method's plugin keeps between experiences (see :func:`plugin_state`);
- the random number generators: Python, NumPy, torch (CPU and CUDA) and the fast data
  path's ``loader_generator``;
- the results so far (accuracy rows, training and consolidation seconds);
- the resolved config, compared with the resuming run's config.

Files are written atomically (temporary file, then ``os.replace``), so a run killed
while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from avalanche.training.plugins import EWCPlugin as AvalancheEWCPlugin
from avalanche.training.utils import ParamData

from vsfcl.ewc import EWCPlugin as TensorEWCPlugin
from vsfcl.io import write_atomic

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1

# Keys that do not change what a run computes, so they may differ on resume.
RESUME_INDEPENDENT_KEYS = (
    "resume",
    "keep_checkpoint",
    "progress_bar",
    "data_root",
    "num_threads",
    "wandb",
)

_CLOCK_COUNTERS = (
    "train_iterations",
    "train_exp_counter",
    "train_exp_epochs",
    "train_exp_iterations",
    "train_epoch_iterations",
    "total_iterations",
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read or used to resume."""


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically with ``torch.save``."""
    write_atomic(path, lambda temporary: torch.save(dict(state), temporary))


def load_checkpoint(path: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; raise :class:`CheckpointError` if it is unusable."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, which would run code from the file.
        raise CheckpointError(
            f"the checkpoint {path} cannot be read: it is corrupt or contains objects other "
            "than tensors and plain values, which weights_only loading rejects; delete it, or "
            "pass resume=false to start the run over"
        ) from None
    except (OSError, RuntimeError, EOFError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"the checkpoint {path} cannot be read ({reason}); delete it, or pass resume=false "
            "to start the run over"
        ) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        version = state.get("format_version") if isinstance(state, dict) else None
        raise CheckpointError(
            f"the checkpoint {path} has format version {version!r}, but this vsfcl reads "
            f"version {FORMAT_VERSION}; pass resume=false to start the run over"
        )
    return state


# ---------------------------------------------------------------------------
# Config comparison
# ---------------------------------------------------------------------------


def _flatten(options: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in options.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Return ``"key: saved -> current"`` for every setting that changes what a run computes."""
    before, after = _flatten(saved), _flatten(current)
    differences = []
    for key in sorted(set(before) | set(after)):
        if key.split(".")[0] in RESUME_INDEPENDENT_KEYS:
            continue
        old, new = before.get(key, "<missing>"), after.get(key, "<missing>")
        if old != new:
            differences.append(f"{key}: {old!r} -> {new!r}")
    return differences


# ---------------------------------------------------------------------------
# Random number generators
# ---------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Return the global Python, NumPy and torch generator states as checkpoint values."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the global generators to a state returned by :func:`capture_rng_state`."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy["bit_generator"],
            "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
            "has_gauss": numpy["has_gauss"],
            "gauss": numpy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ---------------------------------------------------------------------------
# Strategy
# ---------------------------------------------------------------------------


def capture_strategy_state(strategy: Any) -> dict[str, Any]:
    """Return the model, optimizer, clock and data-order state of an Avalanche strategy."""
    state: dict[str, Any] = {
        "model": strategy.model.state_dict(),
        "optimizer": strategy.optimizer.state_dict(),
        "clock": {name: int(getattr(strategy.clock, name)) for name in _CLOCK_COUNTERS},
    }
    task_labels = getattr(strategy.model, "known_train_tasks_labels", None)
    if task_labels is not None:
        state["known_train_tasks_labels"] = sorted(int(label) for label in task_labels)
    generator = getattr(strategy, "loader_generator", None)
    if generator is not None:
        state["loader_generator"] = generator.get_state()
    return state


def restore_strategy_state(strategy: Any, state: Mapping[str, Any]) -> None:
    """Load a state returned by :func:`capture_strategy_state` into a freshly built strategy."""
    strategy.model.to(strategy.device)
    strategy.model.load_state_dict(state["model"])
    strategy.optimizer.load_state_dict(state["optimizer"])
    # Avalanche 0.6.0 resets the optimizer state on the first experience it trains,
    # detected by optimized_param_id being None, so setting it keeps the loaded state.
    strategy.optimized_param_id = dict(strategy.model.named_parameters())
    for name, value in state["clock"].items():
        setattr(strategy.clock, name, value)
    if "known_train_tasks_labels" in state:
        strategy.model.known_train_tasks_labels = set(state["known_train_tasks_labels"])
    if "loader_generator" in state:
        strategy.loader_generator.set_state(state["loader_generator"].cpu())


# ---------------------------------------------------------------------------
# Plugins
# ---------------------------------------------------------------------------


def supports_checkpoint(plugin: Any) -> bool:
    """Return whether :func:`plugin_state` can capture everything ``plugin`` keeps."""
    if plugin is None or isinstance(plugin, (AvalancheEWCPlugin, TensorEWCPlugin)):
        return True
    return callable(getattr(plugin, "state_dict", None)) and callable(
        getattr(plugin, "load_state_dict", None)
    )


def plugin_state(plugin: Any) -> dict[str, Any] | None:
    """Return the state a method plugin keeps between experiences, as checkpoint values.

    Plugins provide it through ``state_dict`` and ``load_state_dict`` methods. The two
    EWC plugins have neither, so their state is read here.
    """
    if plugin is None:
        return None
    if callable(getattr(plugin, "state_dict", None)):
        return plugin.state_dict()
    if isinstance(plugin, AvalancheEWCPlugin):
        return {
            "importances": _param_data_state(plugin.importances),
            "saved_params": _param_data_state(plugin.saved_params),
        }
    if isinstance(plugin, TensorEWCPlugin):
        # NOTE: mirrors the attributes of vsfcl.ewc.EWCPlugin; a state_dict method on
        # that class would take precedence and make this branch unnecessary.
        penalty = plugin.penalty
        return {
            "precision": dict(penalty.precision),
            "mean": dict(penalty.mean),
            "offset": float(penalty.offset),
            "generator": plugin.generator.get_state(),
            "consolidation_seconds": list(plugin.consolidation_seconds),
            "last_penalty": float(plugin.last_penalty),
        }
    raise CheckpointError(f"{type(plugin).__name__} has no state_dict and load_state_dict methods")


def load_plugin_state(plugin: Any, state: Mapping[str, Any] | None) -> None:
    """Load a state returned by :func:`plugin_state` into a freshly built plugin."""
    if plugin is None:
        return
    if state is None:
        raise CheckpointError(
            f"the checkpoint has no state for {type(plugin).__name__}; it was written by a "
            "different strategy, so start over with resume=false"
        )
    if callable(getattr(plugin, "load_state_dict", None)):
        plugin.load_state_dict(state)
    elif isinstance(plugin, AvalancheEWCPlugin):
        plugin.importances.clear()
        plugin.importances.update(_param_data_from_state(state["importances"]))
        plugin.saved_params.clear()
        plugin.saved_params.update(_param_data_from_state(state["saved_params"]))
    elif isinstance(plugin, TensorEWCPlugin):
        plugin.penalty.precision = dict(state["precision"])
        plugin.penalty.mean = dict(state["mean"])
        plugin.penalty.offset = state["offset"]
        plugin.generator.set_state(state["generator"].cpu())
        plugin.consolidation_seconds = list(state["consolidation_seconds"])
        plugin.last_penalty = state["last_penalty"]
    else:
        raise CheckpointError(
            f"{type(plugin).__name__} has no state_dict and load_state_dict methods"
        )


def _param_data_state(values: Mapping[int, Mapping[str, ParamData]]) -> dict[int, dict[str, Any]]:
    return {
        int(experience): {
            key: {"name": data.name, "value": data.data} for key, data in entries.items()
        }
        for experience, entries in values.items()
    }


def _param_data_from_state(
    state: Mapping[int, Mapping[str, Any]],
) -> dict[int, dict[str, ParamData]]:
    return {
        int(experience): {
            key: ParamData(entry["name"], init_tensor=entry["value"], device=entry["value"].device)
            for key, entry in entries.items()
        }
        for experience, entries in state.items()
    }
