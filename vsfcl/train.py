"""``vsfcl-train``: train one network on a stream of experiences and measure forgetting.

A Hydra application over the configs in ``conf/`` (``train.yaml`` and its groups
``benchmark``, ``strategy``, ``model`` and ``optimizer``). Each run writes
``results.json`` plus Avalanche's CSV and TensorBoard logs into Hydra's output
directory. Examples::

    vsfcl-train strategy=ewc strategy.ewc_lambda=100 seed=1
    vsfcl-train -m strategy=naive,ewc,flatness
"""

from __future__ import annotations

import logging
import random
import re
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
from avalanche.logging import CSVLogger, TensorboardLogger
from avalanche.training.plugins import EvaluationPlugin
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import vsfcl
from vsfcl.data.mnist import load_mnist
from vsfcl.io import write_json_atomic
from vsfcl.metrics import average_accuracy, backward_transfer, forgetting
from vsfcl.models import build_mlp
from vsfcl.plugin import FlatnessPlugin
from vsfcl.progress import ConsolidationClock, ProgressBar
from vsfcl.scenarios import TensorBenchmark, permuted_mnist, split_mnist
from vsfcl.strategies import build_strategy
from vsfcl.tensor_data import to_avalanche

log = logging.getLogger(__name__)

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


def resolve_device(requested: str) -> torch.device:
    """Map ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` to a device; ``cuda`` without a GPU is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={requested} was requested but no CUDA GPU is available; use "
                "device=auto (GPU when present, else CPU) or device=cpu"
            )
        return torch.device(requested)
    raise ValueError(f"device={requested!r} is invalid; use auto, cpu, cuda or cuda:N")


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


def _make_evaluator(run_dir: Path) -> EvaluationPlugin:
    return EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        loss_metrics(epoch=True, experience=True, stream=True),
        loggers=[
            CSVLogger(log_folder=str(run_dir / "csv_logs")),
            TensorboardLogger(tb_log_dir=str(run_dir / "tb_logs")),
        ],
    )


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train and evaluate the configured strategy; return the content of ``results.json``."""
    device = resolve_device(str(cfg.device))
    seed = int(cfg.seed)
    seed_everything(seed)
    benchmark = build_benchmark(OmegaConf.to_container(cfg.benchmark, resolve=True), cfg.data_root, seed)
    scenario = to_avalanche(benchmark)
    n_experiences = benchmark.n_experiences
    log.info("%s with %d experiences on %s", benchmark.name, n_experiences, device)

    model = build_mlp(
        hidden_sizes=list(cfg.model.hidden_sizes),
        n_classes=benchmark.n_classes,
        n_heads=benchmark.n_heads,
        activation=cfg.model.activation,
    )
    strategy_options = OmegaConf.to_container(cfg.strategy, resolve=True)
    clock = ConsolidationClock()
    progress = ProgressBar(disable=not cfg.progress_bar)
    built = build_strategy(
        name=strategy_options.pop("name", None),
        options=strategy_options,
        model=model,
        make_optimizer=instantiate(cfg.optimizer),
        evaluator=_make_evaluator(run_dir),
        extra_plugins=[clock.start],
        final_plugins=[clock.stop, progress],
        train_epochs=int(cfg.train_epochs),
        batch_size=int(cfg.batch_size),
        eval_batch_size=int(cfg.eval_batch_size),
        device=device,
        fast_data=bool(cfg.fast_data),
        loader_seed=seed,
    )
    if isinstance(built.method_plugin, FlatnessPlugin):
        progress.penalty_source = built.method_plugin
    strategy = built.strategy

    eval_streams = {"test": scenario.test_stream}
    if cfg.eval_valid:
        eval_streams["valid"] = scenario.valid_stream
    matrices: dict[str, list[list[float]]] = {"test": [], "valid": []}
    train_seconds: list[float] = []

    # Joint training sees the whole stream at once and is evaluated once.
    phases = [scenario.train_stream] if built.joint else list(scenario.train_stream)
    for phase in phases:
        start = time.perf_counter()
        strategy.train(phase)
        elapsed = time.perf_counter() - start
        consolidation = clock.seconds[-1] if clock.seconds else 0.0
        train_seconds.append(elapsed - consolidation)
        for name, stream in eval_streams.items():
            # The evaluator returns the last value of every metric seen so far, so only
            # this stream's entries are current.
            matrices[name].append(_accuracy_rows(strategy.eval(stream), n_experiences)[name])
        log.info("after %s: test accuracy %s", _phase_name(phase), _format_row(matrices["test"][-1]))

    return _results(cfg, benchmark, matrices, train_seconds, clock.seconds, built.method_plugin)


def _phase_name(phase: Any) -> str:
    experience = getattr(phase, "current_experience", None)
    return "joint training" if experience is None else f"experience {experience}"


def _format_row(row: list[float]) -> str:
    return " ".join(f"{value:.3f}" for value in row)


def _results(
    cfg: DictConfig,
    benchmark: TensorBenchmark,
    matrices: dict[str, list[list[float]]],
    train_seconds: list[float],
    consolidation_seconds: list[float],
    method_plugin: Any,
) -> dict[str, Any]:
    test = np.asarray(matrices["test"])
    results: dict[str, Any] = {
        "benchmark": benchmark.name,
        "strategy": cfg.strategy.name,
        "seed": int(cfg.seed),
        "accuracy_matrix": test.tolist(),
        "acc": average_accuracy(test),
        "bwt": backward_transfer(test),
        "forgetting": forgetting(test),
        "train_seconds": train_seconds,
        "consolidation_seconds": consolidation_seconds,
        "complete": True,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if matrices["valid"]:
        valid = np.asarray(matrices["valid"])
        results["valid_accuracy_matrix"] = valid.tolist()
        results["valid_acc"] = average_accuracy(valid)
    if isinstance(method_plugin, FlatnessPlugin):
        results["flatness"] = [vars(c) for c in method_plugin.consolidations]
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    """Format runs side by side: accuracy, BWT, forgetting and time."""
    header = f"{'strategy':<12} {'benchmark':<20} {'seed':>4} {'acc':>7} {'bwt':>7} {'forget':>7} {'train s':>8} {'consol s':>8}"
    lines = [header, "-" * len(header)]

    def number(value: float | None) -> str:
        return "     --" if value is None else f"{value:7.4f}"

    for result in results:
        lines.append(
            f"{result['strategy']:<12} {result['benchmark']:<20} {result['seed']:>4} "
            f"{number(result['acc'])} {number(result['bwt'])} {number(result['forgetting'])} "
            f"{sum(result['train_seconds']):8.1f} {sum(result['consolidation_seconds']):8.1f}"
        )
    return "\n".join(lines)


def format_matrix(matrix: list[list[float]]) -> str:
    columns = len(matrix[0]) if matrix else 0
    lines = ["after \\ on " + " ".join(f"{j:>6}" for j in range(columns))]
    for i, row in enumerate(matrix):
        lines.append(f"{i:>11} " + " ".join(f"{value:6.3f}" for value in row))
    return "\n".join(lines)


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    results = run(cfg, run_dir)
    write_json_atomic(run_dir / "results.json", results)
    print(f"\naccuracy matrix ({results['strategy']}, test):\n{format_matrix(results['accuracy_matrix'])}")
    print(format_table([results]))
    print(f"results: {run_dir / 'results.json'}")
    return float(results["acc"])


if __name__ == "__main__":
    main()
