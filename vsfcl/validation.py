"""Checks on a training run: the config before anything starts, the loss while it trains.

:func:`validate_config` runs once at the boundary, before any data is loaded or any file
is written, so that a bad setting fails in seconds with a message that names the key,
the value and the allowed range. :func:`validate_benchmark` repeats the checks that
need the built benchmark (sample counts, iterations per experience), still before
training. :class:`DivergenceGuard` stops training at the first non-finite loss.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeGuard

import torch
from avalanche.core import SupervisedPlugin

from vsfcl.data.mnist import MNIST_MD5, mnist_raw_dir
from vsfcl.scenarios import TensorBenchmark
from vsfcl.strategies import STRATEGIES, build_method_plugin

BENCHMARKS = ("split_mnist", "permuted_mnist")
SPLIT_SCENARIOS = ("task", "domain", "class")
ACTIVATIONS = ("relu", "tanh", "gelu")
RESUME_MODES = ("auto", True, False)

# Types of the strategy options that the strategy builders convert without checking
# (int("abc") raises a ValueError that does not name the key).
_INTEGER_OPTIONS = ("n_directions", "n_snapshots", "profile_samples", "probe_interval")
_NUMBER_OPTIONS = (
    "window_fraction",
    "psi",
    "profile_max_offset",
    "profile_rtol",
    "profile_initial_step",
    "probe_lr",
)
_POSITIVE_OPTIONS = ("profile_rtol",)

# Config keys of the penalty strength (lambda) per strategy option name, for the
# divergence message.
STRENGTH_KEYS = ("strength", "ewc_lambda", "si_lambda", "mas_lambda", "alpha")


class ConfigError(ValueError):
    """Invalid training config; the message names the key, the value and what is allowed."""


class DivergenceError(RuntimeError):
    """Training produced a NaN or infinite loss or penalty."""


def resolve_device(requested: str) -> torch.device:
    """Map ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` to a device; ``cuda`` without a GPU is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={requested} was requested but no CUDA GPU is available; use "
                "device=auto (GPU when present, else CPU) or device=cpu"
            )
        try:
            return torch.device(requested)
        except RuntimeError as error:
            raise ConfigError(
                f"device={requested!r} is invalid ({error}); use cuda or cuda:N"
            ) from None
    raise ConfigError(f"device={requested!r} is invalid; use auto, cpu, cuda or cuda:N")


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def _is_integer(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require_count(key: str, value: Any, minimum: int = 1) -> int:
    if not _is_integer(value) or value < minimum:
        raise ConfigError(f"{key}={value!r} is invalid; it must be an integer >= {minimum}")
    return value


def _require_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is invalid; it must be true or false")


def validate_config(options: Mapping[str, Any], run_dir: Path) -> None:
    """Check a resolved training config and the output directory; raise :class:`ConfigError`.

    ``options`` is the plain container of the Hydra config (``OmegaConf.to_container``).
    Creates ``run_dir`` if it is missing, and nothing else.
    """
    if not _is_integer(options.get("seed")):
        raise ConfigError(f"seed={options.get('seed')!r} is invalid; it must be an integer")
    resolve_device(str(options.get("device")))
    for key in ("train_epochs", "batch_size", "eval_batch_size"):
        _require_count(key, options.get(key))
    for key in ("fast_data", "eval_valid", "progress_bar", "keep_checkpoint"):
        _require_bool(key, options.get(key))
    threads = options.get("num_threads")
    if threads is not None and (not _is_integer(threads) or threads < 1):
        raise ConfigError(
            f"num_threads={threads!r} is invalid; use an integer >= 1, or null for PyTorch's default"
        )
    wandb = options.get("wandb") or {}
    _require_bool("wandb.enabled", wandb.get("enabled"))
    if wandb.get("mode") not in ("online", "offline", "disabled"):
        raise ConfigError(
            f"wandb.mode={wandb.get('mode')!r} is invalid; use online, offline or disabled"
        )
    if options.get("resume") not in RESUME_MODES:
        raise ConfigError(
            f"resume={options.get('resume')!r} is invalid; use auto (continue from a checkpoint "
            "when the output directory has one), true (require one) or false (start over)"
        )

    _validate_benchmark_options(options["benchmark"])
    _validate_model_options(options["model"])
    _validate_optimizer_options(options["optimizer"])
    _validate_strategy_options(options["strategy"], seed=int(options["seed"]))
    _validate_data_root(options.get("data_root"))
    _require_writable_dir(run_dir)


def _validate_benchmark_options(benchmark: Mapping[str, Any]) -> None:
    name = benchmark.get("name")
    if name not in BENCHMARKS:
        raise ConfigError(
            f"benchmark.name={name!r} is unknown; choose one of {', '.join(BENCHMARKS)}"
        )
    n_experiences = _require_count("benchmark.n_experiences", benchmark.get("n_experiences"))
    if name == "split_mnist":
        if 10 % n_experiences != 0:
            raise ConfigError(
                f"benchmark.n_experiences={n_experiences} does not divide the 10 MNIST classes "
                "into equal groups; use 1, 2, 5 or 10"
            )
        scenario = benchmark.get("scenario")
        if scenario not in SPLIT_SCENARIOS:
            raise ConfigError(
                f"benchmark.scenario={scenario!r} is invalid; use one of {', '.join(SPLIT_SCENARIOS)}"
            )
        order = benchmark.get("class_order")
        if order is not None and sorted(order) != list(range(10)):
            raise ConfigError(
                f"benchmark.class_order={order!r} is invalid; it must be a permutation of 0..9"
            )
    fraction = benchmark.get("valid_fraction")
    if not _is_number(fraction) or not 0.0 <= fraction < 1.0:
        raise ConfigError(
            f"benchmark.valid_fraction={fraction!r} is out of range; it must be in [0, 1)"
        )
    for key in ("train_samples", "test_samples"):
        value = benchmark.get(key)
        if value is not None:
            _require_count(f"benchmark.{key}", value)


def _validate_model_options(model: Mapping[str, Any]) -> None:
    sizes = model.get("hidden_sizes")
    if not isinstance(sizes, list) or not all(_is_integer(size) and size >= 1 for size in sizes):
        raise ConfigError(
            f"model.hidden_sizes={sizes!r} is invalid; it must be a list of integers >= 1, "
            "for example [400, 400]"
        )
    activation = model.get("activation")
    if activation not in ACTIVATIONS:
        raise ConfigError(
            f"model.activation={activation!r} is invalid; use one of {', '.join(ACTIVATIONS)}"
        )


def _validate_optimizer_options(optimizer: Mapping[str, Any]) -> None:
    lr = optimizer.get("lr")
    if not _is_number(lr) or lr <= 0:
        raise ConfigError(f"optimizer.lr={lr!r} is invalid; it must be a finite number > 0")
    momentum = optimizer.get("momentum")
    if momentum is not None and (not _is_number(momentum) or not 0.0 <= momentum < 1.0):
        raise ConfigError(f"optimizer.momentum={momentum!r} is out of range; it must be in [0, 1)")


def _validate_strategy_options(strategy: Mapping[str, Any], seed: int) -> None:
    options = dict(strategy)
    name = options.pop("name", None)
    if name not in STRATEGIES:
        raise ConfigError(
            f"strategy.name={name!r} is unknown; choose one of {', '.join(STRATEGIES)}"
        )
    for key in _INTEGER_OPTIONS:
        if key in options and not _is_integer(options[key]):
            raise ConfigError(f"strategy.{key}={options[key]!r} is invalid; it must be an integer")
    if "remove_drift" in options:
        _require_bool("strategy.remove_drift", options["remove_drift"])
    if options.get("max_directions") is not None and not _is_integer(options["max_directions"]):
        raise ConfigError(
            f"strategy.max_directions={options['max_directions']!r} is invalid; it must be an "
            "integer >= 1, or null to keep n_directions per past experience"
        )
    for key in _NUMBER_OPTIONS:
        if key in options and not _is_number(options[key]):
            raise ConfigError(
                f"strategy.{key}={options[key]!r} is invalid; it must be a finite number"
            )
    for key in _POSITIVE_OPTIONS:
        if key in options and options[key] <= 0:
            raise ConfigError(f"strategy.{key}={options[key]!r} is out of range; it must be > 0")
    # The strategy's own constructor checks the remaining ranges; building a plugin is cheap.
    try:
        build_method_plugin(name, options, seed=seed)
    except (TypeError, ValueError, KeyError) as error:
        raise ConfigError(f"strategy={name}: {error}") from None


def _validate_data_root(data_root: Any) -> None:
    if data_root is not None and not isinstance(data_root, str):
        raise ConfigError(
            f"data_root={data_root!r} is invalid; it must be a directory path or null"
        )
    raw_dir = mnist_raw_dir(data_root)
    if all((raw_dir / name).is_file() for name in MNIST_MD5):
        return  # Checksummed when loaded; a read-only root is fine.
    try:
        _require_writable_dir(raw_dir)
    except ConfigError as error:
        raise ConfigError(
            f"data_root={data_root!r}: MNIST is not in {raw_dir} and the directory cannot be "
            f"written to provision it ({error.__cause__}); choose a writable data_root or place "
            "the four IDX files there"
        ) from None


def _require_writable_dir(directory: Path) -> None:
    """Create ``directory`` if needed and check that a file can be created in it."""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise ConfigError(
            f"the output directory {directory} cannot be written ({error}); choose another "
            "one with hydra.run.dir=DIR or fix its permissions"
        ) from error


def validate_benchmark(benchmark: TensorBenchmark, options: Mapping[str, Any]) -> None:
    """Check what depends on the built benchmark: training samples and the snapshot window."""
    batch_size = int(options["batch_size"])
    train_epochs = int(options["train_epochs"])
    for index, data in enumerate(benchmark.streams["train"]):
        if len(data) == 0:
            raise ConfigError(
                f"experience {index} has no training samples with "
                f"benchmark.train_samples={options['benchmark'].get('train_samples')} and "
                f"benchmark.valid_fraction={options['benchmark']['valid_fraction']}; "
                "raise train_samples or lower valid_fraction"
            )

    strategy = options["strategy"]
    if "window_fraction" not in strategy or "n_snapshots" not in strategy:
        return
    if strategy.get("trajectory", "training") != "training":
        return  # the SGD probe takes its own steps, however short the experience
    # NOTE: this counts the fast path's batches (the last one may be partial); Avalanche's
    # own loader (fast_data=false) may batch differently.
    n_samples = min(len(data) for data in benchmark.streams["train"])
    n_iterations = train_epochs * math.ceil(n_samples / batch_size)
    window = max(1, int(round(strategy["window_fraction"] * n_iterations)))
    if window < 2:
        raise ConfigError(
            f"the snapshot window is {window} iteration(s) long (strategy.window_fraction="
            f"{strategy['window_fraction']} of {n_iterations} iterations per experience, from "
            f"train_epochs={train_epochs}, batch_size={batch_size} and {n_samples} training "
            "samples), but PCA needs at least 2 snapshots; raise window_fraction or "
            "train_epochs, or lower batch_size"
        )


# ---------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------


class DivergenceGuard(SupervisedPlugin):
    """Stop training at the first NaN or infinite loss, penalty or weight.

    Must come before the method's plugin, so that ``before_backward`` reads the data
    loss alone. ``after_backward`` then reads the total with every penalty added, before
    the optimizer step uses it.

    Parameters
    ----------
    learning_rate : tuple of (str, float)
        Config key and value of the learning rate, named in the error.
    strength : tuple of (str, float), optional
        Config key and value of the penalty strength (lambda), if the strategy has one.
    """

    def __init__(
        self, learning_rate: tuple[str, float], strength: tuple[str, float] | None = None
    ) -> None:
        super().__init__()
        self.learning_rate = learning_rate
        self.strength = strength
        self._data_loss = 0.0

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        self._data_loss = float(strategy.loss.detach())
        if not math.isfinite(self._data_loss):
            self._raise(strategy, self._data_loss, penalty=None)

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        total = float(strategy.loss.detach())
        if not math.isfinite(total):
            self._raise(strategy, total, penalty=total - self._data_loss)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        # The last optimizer step can make the weights non-finite with a finite loss.
        for name, parameter in strategy.model.named_parameters():
            if not bool(torch.isfinite(parameter).all()):
                raise DivergenceError(
                    f"training diverged in experience {_experience_of(strategy)}: parameter "
                    f"{name} has non-finite values after the last step; "
                    + self._advice(penalty_at_fault=False)
                )

    def _raise(self, strategy: Any, total: float, penalty: float | None) -> None:
        clock = strategy.clock
        where = (
            f"experience {_experience_of(strategy)}, epoch {clock.train_exp_epochs}, iteration "
            f"{clock.train_exp_iterations} of the experience (counted from 0)"
        )
        if penalty is None:
            value = f"the data loss is {total}"
        else:
            value = f"the loss is {total} (data loss {self._data_loss}, penalty {penalty})"
        penalty_at_fault = penalty is not None and math.isfinite(self._data_loss)
        raise DivergenceError(
            f"training diverged in {where}: {value}; " + self._advice(penalty_at_fault)
        )

    def _advice(self, penalty_at_fault: bool) -> str:
        lr_key, lr = self.learning_rate
        lr_advice = f"the learning rate {lr_key}={lr:g}"
        if self.strength is None:
            return f"lower {lr_advice}"
        strength_key, strength = self.strength
        strength_advice = f"the penalty strength {strength_key}={strength:g}"
        if penalty_at_fault:
            return f"the penalty overflowed, so lower {strength_advice} (or {lr_advice})"
        return f"lower {lr_advice} or {strength_advice}"


def _experience_of(strategy: Any) -> str:
    experience = getattr(strategy.experience, "current_experience", None)
    return "joint training" if experience is None else str(experience)


def strength_setting(strategy: Mapping[str, Any]) -> tuple[str, float] | None:
    """Return the config key and value of the strategy's penalty strength, if it has one."""
    for key in STRENGTH_KEYS:
        if _is_number(strategy.get(key)):
            return f"strategy.{key}", float(strategy[key])
    return None
