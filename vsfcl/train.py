"""``vsfcl-train``: train one network on a stream of experiences and measure forgetting.

A Hydra application over the configs in ``conf/`` (``train.yaml`` and its groups
``benchmark``, ``strategy``, ``model`` and ``optimizer``). Each run writes
``results.json`` plus Avalanche's CSV and TensorBoard logs into Hydra's output
directory, and ``checkpoint.pt`` after every experience. A run started again in the same
directory continues from its checkpoint (``resume=auto``, the default). Examples::

    vsfcl-train strategy=ewc strategy.ewc_lambda=100 seed=1
    vsfcl-train -m strategy=naive,ewc,flatness
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
from avalanche.logging import CSVLogger, TensorboardLogger
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import SupervisedTemplate
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import vsfcl
from vsfcl.checkpoint import (
    CHECKPOINT_FILE,
    FORMAT_VERSION,
    CheckpointError,
    capture_rng_state,
    capture_strategy_state,
    config_differences,
    load_checkpoint,
    load_plugin_state,
    plugin_state,
    restore_rng_state,
    restore_strategy_state,
    save_checkpoint,
    supports_checkpoint,
)
from vsfcl.data.mnist import DataRootError, MnistUnavailableError, load_mnist
from vsfcl.io import write_json_atomic
from vsfcl.metrics import average_accuracy, backward_transfer, forgetting
from vsfcl.models import build_mlp
from vsfcl.plugin import FlatnessPlugin, ProbeDivergenceError, select_parameters
from vsfcl.progress import ConsolidationClock, PenaltyMetric, ProgressBar
from vsfcl.scenarios import TensorBenchmark, permuted_mnist, split_mnist
from vsfcl.strategies import build_strategy
from vsfcl.tensor_data import to_avalanche
from vsfcl.validation import (
    ConfigError,
    DivergenceError,
    DivergenceGuard,
    resolve_device,
    strength_setting,
    validate_benchmark,
    validate_config,
)

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"

_EXPERIENCE_KEY = re.compile(r"^Top1_Acc_Exp/eval_phase/(\w+)_stream/Task\d+/Exp(\d+)$")


def config_dir() -> str:
    """Return the directory of the Hydra configs: inside the wheel, or the source tree's ``conf/``."""
    package = Path(vsfcl.__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"the vsfcl configs were not found in {package / 'conf'} or {package.parent / 'conf'}; "
        "reinstall the package (pip install vsfcl) or run from a source checkout"
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_benchmark(options: dict[str, Any], data_root: str | None, seed: int) -> TensorBenchmark:
    """Load MNIST (provisioning it on first use) and build the configured benchmark."""
    name = options.get("name")
    common = {
        "valid_fraction": options["valid_fraction"],
        "seed": seed,
        "train_samples": options.get("train_samples"),
        "test_samples": options.get("test_samples"),
    }
    if name not in ("split_mnist", "permuted_mnist"):
        raise ValueError(f"benchmark={name!r} is unknown; choose split_mnist or permuted_mnist")
    mnist = load_mnist(data_root)
    if name == "split_mnist":
        return split_mnist(
            mnist,
            scenario=options["scenario"],
            n_experiences=options["n_experiences"],
            class_order=options.get("class_order"),
            **common,
        )
    return permuted_mnist(mnist, n_experiences=options["n_experiences"], **common)


def _accuracy_rows(metrics: dict[str, Any], n_experiences: int) -> dict[str, list[float]]:
    """Pick the per-experience accuracies of each evaluated stream out of Avalanche's metrics."""
    rows: dict[str, list[float]] = {}
    for key, value in metrics.items():
        match = _EXPERIENCE_KEY.match(key)
        if match:
            stream, experience = match.group(1), int(match.group(2))
            rows.setdefault(stream, [float("nan")] * n_experiences)[experience] = float(value)
    return rows


def _make_evaluator(run_dir: Path, cfg: DictConfig) -> EvaluationPlugin:
    metrics: list[Any] = [
        accuracy_metrics(experience=True, stream=True),
        loss_metrics(epoch=True, experience=True, stream=True),
    ]
    if cfg.strategy.name == "flatness":
        metrics.append(PenaltyMetric())
    loggers: list[Any] = [
        CSVLogger(log_folder=str(run_dir / "csv_logs")),
        TensorboardLogger(tb_log_dir=str(run_dir / "tb_logs")),
    ]
    if cfg.wandb.enabled:
        # Imported here because wandb is optional and slow to import.
        from avalanche.logging import WandBLogger

        loggers.append(
            WandBLogger(
                project_name=cfg.wandb.project,
                run_name=f"{cfg.strategy.name}-seed{cfg.seed}",
                dir=str(run_dir),
                config=OmegaConf.to_container(cfg, resolve=True),
                params={"mode": cfg.wandb.mode, "entity": cfg.wandb.entity},
            )
        )
    return EvaluationPlugin(*metrics, loggers=loggers)


@dataclass
class Session:
    """A built run: the strategy, its plugins and the phases it trains, in order."""

    strategy: SupervisedTemplate
    method_plugin: Any
    clock: ConsolidationClock
    phases: list[Any]
    eval_streams: dict[str, Any]


@dataclass
class Progress:
    """Results of the phases finished so far; the part of ``results.json`` a checkpoint keeps."""

    matrices: dict[str, list[list[float]]] = field(
        default_factory=lambda: {"test": [], "valid": []}
    )
    train_seconds: list[float] = field(default_factory=list)

    @property
    def n_phases_done(self) -> int:
        return len(self.train_seconds)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train and evaluate the configured strategy in ``run_dir``; write and return ``results.json``.

    The config is validated before anything is loaded or written. Depending on
    ``cfg.resume``, a run continues from ``checkpoint.pt`` in ``run_dir``, and a run
    whose ``results.json`` is already complete returns it without training. A checkpoint
    is written after every experience. If training fails, ``results.json`` keeps the
    finished experiences with ``"complete": false`` and the error, and the error is
    raised again.
    """
    run_dir = Path(run_dir)
    options: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    validate_config(options, run_dir)
    device = resolve_device(str(cfg.device))
    if cfg.num_threads is not None:
        torch.set_num_threads(int(cfg.num_threads))

    # Decide between a finished run, a resumed run and a new one, before any training.
    finished = _finished_results(options, run_dir)
    if finished is not None:
        return finished
    saved = _checkpoint_to_resume(options, run_dir, device)

    seed = int(cfg.seed)
    seed_everything(seed)
    benchmark = build_benchmark(options["benchmark"], cfg.data_root, seed)
    validate_benchmark(benchmark, options)
    if options["resume"] is False:
        _discard_previous_run(run_dir)
    log.info("%s with %d experiences on %s", benchmark.name, benchmark.n_experiences, device)
    session = _build_session(cfg, options, benchmark, run_dir, device)

    progress = Progress()
    if saved is not None:
        _restore(session, progress, saved)
        log.info(
            "resumed from %s after %d finished phase(s)",
            run_dir / CHECKPOINT_FILE,
            progress.n_phases_done,
        )
    checkpointing = supports_checkpoint(session.method_plugin)
    if not checkpointing:
        # NOTE: such a run cannot resume; it starts over when started again.
        log.warning(
            "no checkpoints are written: %s has no state_dict and load_state_dict methods",
            type(session.method_plugin).__name__,
        )

    results_path = run_dir / RESULTS_FILE
    try:
        for index in range(progress.n_phases_done, len(session.phases)):
            _train_phase(session, progress, session.phases[index], benchmark.n_experiences)
            if checkpointing:
                save_checkpoint(
                    run_dir / CHECKPOINT_FILE, _checkpoint_state(options, session, progress)
                )
    except Exception as error:
        # An error inside an experience leaves its progress bar open.
        for plugin in session.strategy.plugins:
            if isinstance(plugin, ProgressBar):
                plugin.close()
        partial = _results(
            cfg, benchmark, progress, session, error=f"{type(error).__name__}: {error}"
        )
        write_json_atomic(results_path, partial)
        raise

    results = _results(cfg, benchmark, progress, session)
    write_json_atomic(results_path, results)
    if not cfg.keep_checkpoint:
        _remove_if_present(run_dir / CHECKPOINT_FILE)
    return results


def _build_session(
    cfg: DictConfig,
    options: dict[str, Any],
    benchmark: TensorBenchmark,
    run_dir: Path,
    device: torch.device,
) -> Session:
    scenario = to_avalanche(benchmark)
    model = build_mlp(
        hidden_sizes=list(cfg.model.hidden_sizes),
        n_classes=benchmark.n_classes,
        n_heads=benchmark.n_heads,
        activation=cfg.model.activation,
    )

    strategy_options = dict(options["strategy"])
    guard = DivergenceGuard(
        ("optimizer.lr", float(cfg.optimizer.lr)), strength_setting(strategy_options)
    )
    clock = ConsolidationClock()
    progress_bar = ProgressBar(disable=not cfg.progress_bar)
    built = build_strategy(
        name=strategy_options.pop("name", None),
        options=strategy_options,
        model=model,
        make_optimizer=instantiate(cfg.optimizer),
        evaluator=_make_evaluator(run_dir, cfg),
        # The guard comes before the method's plugin; see DivergenceGuard.
        extra_plugins=[guard, clock.start],
        final_plugins=[clock.stop, progress_bar],
        train_epochs=int(cfg.train_epochs),
        batch_size=int(cfg.batch_size),
        eval_batch_size=int(cfg.eval_batch_size),
        device=device,
        fast_data=bool(cfg.fast_data),
        loader_seed=int(cfg.seed),
    )
    if isinstance(built.method_plugin, FlatnessPlugin):
        progress_bar.penalty_source = built.method_plugin
        # A pattern that matches no parameter would otherwise fail at the first step.
        try:
            select_parameters(model, built.method_plugin.parameter_patterns)
        except ValueError as error:
            raise ConfigError(f"strategy.parameters: {error}") from None

    eval_streams = {"test": scenario.test_stream}
    if cfg.eval_valid:
        eval_streams["valid"] = scenario.valid_stream
    # Joint training trains on the whole stream at once and is evaluated once.
    phases = [scenario.train_stream] if built.joint else list(scenario.train_stream)
    return Session(built.strategy, built.method_plugin, clock, phases, eval_streams)


def _train_phase(session: Session, progress: Progress, phase: Any, n_experiences: int) -> None:
    """Train on one phase, then evaluate every stream and record a row per stream."""
    strategy = session.strategy
    start = time.perf_counter()
    strategy.train(phase)
    elapsed = time.perf_counter() - start
    consolidation = session.clock.seconds[-1] if session.clock.seconds else 0.0
    rows = {}
    for name, stream in session.eval_streams.items():
        # The evaluator returns the last value of every metric seen so far, so only
        # this stream's entries are current.
        rows[name] = _accuracy_rows(strategy.eval(stream), n_experiences)[name]
    # Recorded only once the phase is complete, so a failure leaves whole rows.
    for name, row in rows.items():
        progress.matrices[name].append(row)
    progress.train_seconds.append(elapsed - consolidation)
    log.info("after %s: test accuracy %s", _phase_name(phase), _format_row(rows["test"]))


# ---------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------


def _finished_results(options: dict[str, Any], run_dir: Path) -> dict[str, Any] | None:
    """Return a complete ``results.json`` of the same config in ``run_dir``, unless ``resume=false``.

    A complete result of a different config is an error, so that it is never
    overwritten by mistake.
    """
    results_path = run_dir / RESULTS_FILE
    if options["resume"] is False:
        return None
    if not results_path.exists() or (run_dir / CHECKPOINT_FILE).exists():
        return None
    try:
        previous = json.loads(results_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{results_path} cannot be read ({error}); delete it, or pass resume=false to start over"
        ) from None
    if not previous.get("complete"):
        return None
    differences = config_differences(previous.get("config", {}), options)
    if differences:
        raise ConfigError(
            f"{results_path} contains a complete run with different settings ({'; '.join(differences)}); "
            "pass resume=false to replace it, or choose another output directory with hydra.run.dir=DIR"
        )
    log.info("%s is already complete; nothing to train", results_path)
    return previous


def _checkpoint_to_resume(
    options: dict[str, Any], run_dir: Path, device: torch.device
) -> dict[str, Any] | None:
    """Load the checkpoint to resume from, according to ``resume``, after checking its config."""
    path = run_dir / CHECKPOINT_FILE
    if options["resume"] is False or not path.exists():
        if options["resume"] is True:
            raise ConfigError(
                f"resume=true but {run_dir} has no {CHECKPOINT_FILE} to resume from; use resume=auto "
                "to start a new run when there is none"
            )
        return None
    saved = load_checkpoint(path, map_location=device)
    differences = config_differences(saved["config"], options)
    if differences:
        raise ConfigError(
            f"the checkpoint {path} was written with different settings ({'; '.join(differences)}); "
            "resume with the same settings, pass resume=false to start over, or choose another "
            "output directory with hydra.run.dir=DIR"
        )
    return saved


def _checkpoint_state(
    options: dict[str, Any], session: Session, progress: Progress
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "config": options,
        "strategy": capture_strategy_state(session.strategy),
        "method_plugin": plugin_state(session.method_plugin),
        "consolidation_seconds": list(session.clock.seconds),
        "matrices": progress.matrices,
        "train_seconds": progress.train_seconds,
        # Last, so that the state matches the generators' position at this point.
        "rng": capture_rng_state(),
    }


def _restore(session: Session, progress: Progress, saved: dict[str, Any]) -> None:
    restore_strategy_state(session.strategy, saved["strategy"])
    load_plugin_state(session.method_plugin, saved["method_plugin"])
    session.clock.seconds = list(saved["consolidation_seconds"])
    progress.matrices = {
        name: [list(row) for row in rows] for name, rows in saved["matrices"].items()
    }
    progress.train_seconds = list(saved["train_seconds"])
    restore_rng_state(saved["rng"])


def _discard_previous_run(run_dir: Path) -> None:
    for path in (run_dir / RESULTS_FILE, run_dir / CHECKPOINT_FILE):
        if path.exists():
            log.info("resume=false: removing %s", path)
            _remove_if_present(path)


def _remove_if_present(path: Path) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _phase_name(phase: Any) -> str:
    experience = getattr(phase, "current_experience", None)
    return "joint training" if experience is None else f"experience {experience}"


def _format_row(row: list[float]) -> str:
    return " ".join(f"{value:.3f}" for value in row)


def _results(
    cfg: DictConfig,
    benchmark: TensorBenchmark,
    progress: Progress,
    session: Session,
    error: str | None = None,
) -> dict[str, Any]:
    """Assemble ``results.json``; with ``error``, a partial result with ``"complete": false``.

    A partial result keeps the rows of the finished phases, and its ``acc``, ``bwt``
    and ``forgetting`` are null because they describe a whole stream.
    """
    test = np.asarray(progress.matrices["test"])
    complete = error is None
    results: dict[str, Any] = {
        "benchmark": benchmark.name,
        "strategy": cfg.strategy.name,
        "seed": int(cfg.seed),
        "accuracy_matrix": test.tolist(),
        "acc": average_accuracy(test) if complete else None,
        "bwt": backward_transfer(test) if complete else None,
        "forgetting": forgetting(test) if complete else None,
        "train_seconds": list(progress.train_seconds),
        "consolidation_seconds": list(session.clock.seconds[: progress.n_phases_done]),
        "complete": complete,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if error is not None:
        results["error"] = error
    if progress.matrices["valid"]:
        valid = np.asarray(progress.matrices["valid"])
        results["valid_accuracy_matrix"] = valid.tolist()
        results["valid_acc"] = average_accuracy(valid) if complete else None
    if isinstance(session.method_plugin, FlatnessPlugin):
        results["flatness"] = [dict(vars(c)) for c in session.method_plugin.consolidations]
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    """Format runs side by side: accuracy, BWT, forgetting and time."""
    header = f"{'strategy':<12} {'benchmark':<20} {'seed':>4} {'acc':>7} {'bwt':>7} {'forget':>7} {'train s':>8} {'consol s':>8}"
    show_overrides = any(result.get("overrides") for result in results)
    if show_overrides:
        header += "  overrides"
    lines = [header, "-" * len(header)]

    def number(value: float | None) -> str:
        return "     --" if value is None else f"{value:7.4f}"

    for result in results:
        lines.append(
            f"{result['strategy']:<12} {result['benchmark']:<20} {result['seed']:>4} "
            f"{number(result['acc'])} {number(result['bwt'])} {number(result['forgetting'])} "
            f"{sum(result['train_seconds']):8.1f} {sum(result['consolidation_seconds']):8.1f}"
            + ("  " + " ".join(result.get("overrides", [])) if show_overrides else "")
        )
    return "\n".join(lines)


def format_matrix(matrix: list[list[float]]) -> str:
    columns = len(matrix[0]) if matrix else 0
    lines = ["after \\ on " + " ".join(f"{j:>6}" for j in range(columns))]
    for i, row in enumerate(matrix):
        lines.append(f"{i:>11} " + " ".join(f"{value:6.3f}" for value in row))
    return "\n".join(lines)


# Errors the user can fix from the message alone; the CLI prints them without a traceback.
USER_ERRORS = (
    ConfigError,
    CheckpointError,
    DivergenceError,
    ProbeDivergenceError,
    MnistUnavailableError,
    DataRootError,
)


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    hydra_config = HydraConfig.get()
    run_dir = Path(hydra_config.runtime.output_dir)
    try:
        results = run(cfg, run_dir)
    except USER_ERRORS as error:
        log.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        if hydra_config.mode == RunMode.MULTIRUN:
            # Hydra records the failed job, runs the others and exits non-zero at the end.
            raise
        raise SystemExit(1) from None
    print(
        f"\naccuracy matrix ({results['strategy']}, test):\n{format_matrix(results['accuracy_matrix'])}"
    )
    print(format_table([results]))
    print(f"results: {run_dir / RESULTS_FILE}")
    return float(results["acc"])


if __name__ == "__main__":
    main()
