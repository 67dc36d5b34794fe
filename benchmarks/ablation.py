"""Ablation of the flatness regularizer: one setting changed at a time from the tuned default.

Each variant is a list of ``vsfcl-train`` overrides on top of ``strategy=flatness``
with its config defaults (K = 20 directions from 40 snapshots, stiffness from loss
profiles, K rows kept per past experience, the penalty's gradient added to the
loss's), at lambda = 1e5. Two families:

- ``training``: snapshots of the strategy's own steps over the last half of each
  experience, the setting before this ablation. Each of its variants changes one
  thing: K (5, 10, 39, or 100 with 101 snapshots), the stiffness source
  (``variance``, ``hessian``), the snapshot window (last quarter, all), the removal
  of a linear drift before PCA, the accumulation across experiences (merged into 20
  or 60 rows in all), or the update rule (a decoupled proximal step instead of the
  gradient).
- ``sgd_probe``: snapshots of a plain-SGD probe from the final weights of each
  experience (the default after this ablation), with its own strength, K,
  stiffness, probe length (one step between snapshots instead of five),
  accumulation and update variants.

Every run is written to ``<out>/<benchmark>/ablation/<variant>/seed<k>.json`` and
skipped when that file exists, so an interrupted ablation resumes. ``--table`` prints
the Markdown table of what is stored (validation and test accuracy, mean and standard
deviation over the stored seeds, and the seconds spent training and consolidating).

Example (the table in BENCHMARKS.md)::

    OMP_NUM_THREADS=1 python benchmarks/ablation.py --benchmark split_mnist/domain --seeds 0
    python benchmarks/ablation.py --benchmark split_mnist/domain --table
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tune import BENCHMARKS, run_once  # noqa: E402

# The flatness settings before the ablation: snapshots of the strategy's own (Adam) steps.
TRAINING = ["strategy.trajectory=training", "strategy.strength=1e5"]
# The settings after it: snapshots of a plain-SGD probe from the final weights.
PROBE = ["strategy.trajectory=sgd_probe", "strategy.strength=1e5"]

VARIANTS: dict[str, list[str]] = {
    "training": TRAINING,
    "training,K=5": [*TRAINING, "strategy.n_directions=5"],
    "training,K=10": [*TRAINING, "strategy.n_directions=10"],
    "training,K=39": [*TRAINING, "strategy.n_directions=39"],
    "training,K=100": [*TRAINING, "strategy.n_directions=100", "strategy.n_snapshots=101"],
    "training,stiffness=variance,strength=1": [
        *TRAINING,
        "strategy.stiffness=variance",
        "strategy.strength=1",
    ],
    "training,stiffness=variance,strength=10": [
        *TRAINING,
        "strategy.stiffness=variance",
        "strategy.strength=10",
    ],
    "training,stiffness=hessian": [*TRAINING, "strategy.stiffness=hessian"],
    "training,stiffness=hessian,strength=1e6": [
        *TRAINING,
        "strategy.stiffness=hessian",
        "strategy.strength=1e6",
    ],
    "training,window=0.25": [*TRAINING, "strategy.window_fraction=0.25"],
    "training,window=1": [*TRAINING, "strategy.window_fraction=1.0"],
    "training,remove_drift": [*TRAINING, "strategy.remove_drift=true"],
    "training,merged,max_directions=20": [*TRAINING, "strategy.max_directions=20"],
    "training,merged,max_directions=60": [*TRAINING, "strategy.max_directions=60"],
    "training,update=decoupled,strength=1e6": [
        *TRAINING,
        "strategy.update=decoupled",
        "strategy.strength=1e6",
    ],
    "sgd_probe": PROBE,
    "sgd_probe,strength=1": [*PROBE, "strategy.strength=1"],
    "sgd_probe,strength=10": [*PROBE, "strategy.strength=10"],
    "sgd_probe,strength=1e2": [*PROBE, "strategy.strength=1e2"],
    "sgd_probe,strength=1e4": [*PROBE, "strategy.strength=1e4"],
    "sgd_probe,strength=1e6": [*PROBE, "strategy.strength=1e6"],
    "sgd_probe,K=39": [*PROBE, "strategy.n_directions=39"],
    "sgd_probe,stiffness=variance,strength=10": [
        *PROBE,
        "strategy.stiffness=variance",
        "strategy.strength=10",
    ],
    "sgd_probe,probe_interval=1": [*PROBE, "strategy.probe_interval=1"],
    "sgd_probe,merged,max_directions=20": [*PROBE, "strategy.max_directions=20"],
    "sgd_probe,update=decoupled,strength=1e6": [
        *PROBE,
        "strategy.update=decoupled",
        "strategy.strength=1e6",
    ],
}


def stored(out: Path, benchmark: str, variant: str) -> list[dict]:
    """Return the stored runs of a variant, in seed order."""
    folder = out / benchmark / "ablation" / variant
    return [json.loads(path.read_text()) for path in sorted(folder.glob("seed*.json"))]


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def table(out: Path, benchmark: str) -> str:
    lines = [
        "| variant | seeds | valid acc (%) | test acc (%) | valid acc, seed 0 (%) "
        "| training (s, median) | consolidation (s, median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        runs = stored(out, benchmark, variant)
        if not runs:
            continue
        seconds = [sum(r["train_seconds"]) for r in runs]
        consolidation = [sum(r["consolidation_seconds"]) for r in runs]
        lines.append(
            f"| {variant} | {len(runs)} | {mean_std([r['valid_acc'] for r in runs])} | "
            f"{mean_std([r['acc'] for r in runs])} | "
            f"{mean_std([r['valid_acc'] for r in runs if r['seed'] == 0])} | "
            f"{statistics.median(seconds):.0f} | "
            f"{statistics.median(consolidation):.1f} |"
        )
    if len(lines) == 2:
        return f"no ablation runs stored under {out / benchmark / 'ablation'}"
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--benchmark", required=True, choices=sorted(BENCHMARKS), help="benchmark to ablate on"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        metavar="VARIANT",
        help="variants to run, by the names that --table prints (default: all)",
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="seeds to run (not used by --table)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results"),
        help="directory of the run records",
    )
    parser.add_argument(
        "--override",
        nargs="*",
        default=[],
        dest="extra",
        help="extra vsfcl-train overrides for every run, e.g. train_epochs=1",
    )
    parser.add_argument("--table", action="store_true", help="print the table of stored runs")
    args = parser.parse_args()

    if args.table:
        print(table(args.out, args.benchmark))
        return

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("vsfcl", "avalanche"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for seed in args.seeds:
        for variant in args.variants:
            run_once(
                args.benchmark,
                "ablation",
                ["strategy=flatness", *VARIANTS[variant]],
                seed,
                args.extra,
                args.out,
                name=variant,
            )


if __name__ == "__main__":
    main()
