"""Tune every method's strength on the validation split, then evaluate it on the test set over seeds.

For each method, every point of its grid is trained with the first seed; the point
with the highest ``valid_acc`` (mean validation accuracy after the last experience) is
then trained with the remaining seeds. The test accuracy of the first seed's run at
the chosen point counts as one of the seeds: it was chosen on validation data, so its
test accuracy is not selected on. Every run is written to
``<out>/<benchmark>/<method>/<point>/seed<k>.json`` and skipped when that file exists,
so an interrupted tuning resumes. Runs call :func:`vsfcl.train.run` in-process.

Example (split MNIST, domain-incremental, the settings of Hsu et al. 2018)::

    OMP_NUM_THREADS=1 python benchmarks/tune.py --benchmark split_mnist/domain --seeds 0 1 2
    python benchmarks/accuracy_table.py

Every grid has ``GRID_SIZE`` points, so that no method gets more tries on the
validation split than another.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir

from vsfcl.io import write_json_atomic
from vsfcl.train import config_dir, run

log = logging.getLogger("tune")

GRID_SIZE = 4

# Each grid point is a list of config overrides; its directory name is built from them.
GRIDS: dict[str, list[list[str]]] = {
    "naive": [["strategy=naive"]],
    "joint": [["strategy=joint"]],
    "ewc": [
        ["strategy=ewc", "strategy.fisher=batched", f"strategy.ewc_lambda={v}"]
        for v in ("1e2", "1e3", "1e4", "1e5")
    ],
    "ewc_empirical": [
        ["strategy=ewc", "strategy.fisher=empirical", f"strategy.ewc_lambda={v}"]
        for v in ("1e2", "1e3", "1e4", "1e5")
    ],
    "ewc_sampled": [
        ["strategy=ewc", "strategy.fisher=sampled", f"strategy.ewc_lambda={v}"]
        for v in ("1e2", "1e3", "1e4", "1e5")
    ],
    "online_ewc": [
        ["strategy=online_ewc", f"strategy.ewc_lambda={v}"] for v in ("1e2", "1e3", "1e4", "1e5")
    ],
    "synaptic_intelligence": [
        ["strategy=synaptic_intelligence", f"strategy.si_lambda={v}"]
        for v in ("0.1", "1", "10", "100")
    ],
    "mas": [["strategy=mas", f"strategy.mas_lambda={v}"] for v in ("0.1", "1", "10", "100")],
    "lwf": [["strategy=lwf", f"strategy.alpha={v}"] for v in ("0.25", "1", "4", "16")],
    # Snapshots from a plain-SGD probe after each experience, K = 20, stiffness from
    # loss profiles: the settings that benchmarks/ablation.py picked on the validation
    # split of domain-incremental split MNIST (seed 0).
    "flatness": [
        ["strategy=flatness", "strategy.trajectory=sgd_probe", f"strategy.strength={v}"]
        for v in ("1e2", "1e3", "1e4", "1e5")
    ],
    # The settings before the ablation: snapshots of the strategy's own Adam steps;
    # strength and stiffness source share the four points.
    "flatness_training": [
        [
            "strategy=flatness",
            "strategy.trajectory=training",
            "strategy.stiffness=flatness",
            f"strategy.strength={v}",
        ]
        for v in ("1e2", "1e3", "1e4")
    ]
    + [
        [
            "strategy=flatness",
            "strategy.trajectory=training",
            "strategy.stiffness=variance",
            "strategy.strength=1",
        ]
    ],
}

BENCHMARKS: dict[str, list[str]] = {
    "split_mnist/task": ["benchmark=split_mnist", "benchmark.scenario=task"],
    "split_mnist/domain": ["benchmark=split_mnist", "benchmark.scenario=domain"],
    "split_mnist/class": ["benchmark=split_mnist", "benchmark.scenario=class"],
    "permuted_mnist": ["benchmark=permuted_mnist", "benchmark.n_experiences=10"],
}


def point_name(overrides: list[str]) -> str:
    """Return a directory name for a grid point, e.g. ``fisher=batched,ewc_lambda=1e3``."""
    keys = [o.removeprefix("strategy.") for o in overrides if o.startswith("strategy.")]
    return ",".join(keys) or "default"


def run_once(
    benchmark: str,
    method: str,
    overrides: list[str],
    seed: int,
    extra: list[str],
    out: Path,
    name: str | None = None,
) -> dict[str, Any]:
    """Train one configuration, or load its stored result; return the result.

    The result goes to ``<out>/<benchmark>/<method>/<name>/seed<seed>.json``, where
    ``name`` defaults to :func:`point_name` of the overrides.
    """
    name = name or point_name(overrides)
    path = out / benchmark / method / name / f"seed{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    all_overrides = [
        *BENCHMARKS[benchmark],
        *overrides,
        f"seed={seed}",
        "progress_bar=false",
        *extra,
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=all_overrides)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        result = run(cfg, Path(run_dir))
    result["wall_seconds"] = time.perf_counter() - start
    result["overrides"] = all_overrides
    write_json_atomic(path, result)
    log.info(
        "%s %s %s seed %d: valid_acc %.4f, test acc %.4f, %.0f s",
        benchmark,
        method,
        name,
        seed,
        result.get("valid_acc", float("nan")),
        result["acc"],
        result["wall_seconds"],
    )
    return result


def tune(benchmark: str, method: str, seeds: list[int], extra: list[str], out: Path) -> None:
    """Run the grid on the first seed, pick the best ``valid_acc``, run the other seeds there."""
    grid = GRIDS[method]
    scores = []
    for overrides in grid:
        result = run_once(benchmark, method, overrides, seeds[0], extra, out)
        scores.append(result.get("valid_acc") or 0.0)
    best = grid[max(range(len(grid)), key=lambda i: scores[i])]
    write_json_atomic(
        out / benchmark / method / "selection.json",
        {
            "grid": [point_name(o) for o in grid],
            "valid_acc": scores,
            "chosen": point_name(best),
            "tuning_seed": seeds[0],
            "seeds": seeds,
            "extra_overrides": extra,
        },
    )
    for seed in seeds[1:]:
        run_once(benchmark, method, best, seed, extra, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(GRIDS),
        choices=list(GRIDS),
        help="methods to tune (default: all)",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0, 1, 2],
        help="the first seed tunes; all are evaluated",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results"), help="directory of the run records"
    )
    parser.add_argument(
        "--override",
        nargs="*",
        default=[],
        dest="extra",
        help="extra vsfcl-train overrides for every run, e.g. train_epochs=1 benchmark.train_samples=10000",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("vsfcl", "avalanche"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for method in args.methods:
        if method not in ("naive", "joint") and len(GRIDS[method]) != GRID_SIZE:
            raise ValueError(
                f"the grid of {method} has {len(GRIDS[method])} points, not {GRID_SIZE}"
            )
        tune(args.benchmark, method, args.seeds, args.extra, args.out)


if __name__ == "__main__":
    main()
