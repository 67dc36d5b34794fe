"""Ablation of the flatness regularizer: one setting changed at a time from the tuned default.

Each variant is a list of ``vsfcl-train`` overrides on top of ``strategy=flatness``
with its config defaults (K = 20 directions from 40 snapshots over the last half of
each experience, stiffness from loss profiles, lambda = 1e5, K rows kept per past
experience). The variants change:

- ``K``: the directions kept per experience (5, 10, 39; 100 with 101 snapshots);
- the stiffness source: ``variance`` (no loss profiles) and ``hessian``, each at the
  strength that makes its median stiffness comparable, and at one ten times larger;
- the snapshot window: the last quarter, or all of each experience;
- accumulation across experiences: penalties merged into 20 or 60 rows in all
  (``max_directions``) instead of 20 rows per past experience.

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

VARIANTS: dict[str, list[str]] = {
    "default": [],
    "K=5": ["strategy.n_directions=5"],
    "K=10": ["strategy.n_directions=10"],
    "K=39": ["strategy.n_directions=39"],
    "K=100": ["strategy.n_directions=100", "strategy.n_snapshots=101"],
    "stiffness=variance,strength=1": ["strategy.stiffness=variance", "strategy.strength=1"],
    "stiffness=variance,strength=10": ["strategy.stiffness=variance", "strategy.strength=10"],
    "stiffness=hessian": ["strategy.stiffness=hessian"],
    "stiffness=hessian,strength=1e6": ["strategy.stiffness=hessian", "strategy.strength=1e6"],
    "window=0.25": ["strategy.window_fraction=0.25"],
    "window=1": ["strategy.window_fraction=1.0"],
    "merged,max_directions=20": ["strategy.max_directions=20"],
    "merged,max_directions=60": ["strategy.max_directions=60"],
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
        "| variant | seeds | valid acc (%) | test acc (%) | training (s, median) | consolidation (s, median) |",
        "|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        runs = stored(out, benchmark, variant)
        if not runs:
            continue
        seconds = [sum(r["train_seconds"]) for r in runs]
        consolidation = [sum(r["consolidation_seconds"]) for r in runs]
        lines.append(
            f"| {variant} | {len(runs)} | {mean_std([r['valid_acc'] for r in runs])} | "
            f"{mean_std([r['acc'] for r in runs])} | {statistics.median(seconds):.0f} | "
            f"{statistics.median(consolidation):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="variants to run (default: all)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
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
