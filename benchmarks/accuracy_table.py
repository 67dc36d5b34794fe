"""Collect the runs of ``benchmarks/tune.py`` into Markdown accuracy tables.

For each benchmark and method: the grid point chosen on the validation split, the
validation accuracy of every grid point (first seed), and the test accuracy after the
last experience at the chosen point as mean ± sample standard deviation over the
seeds found. Reference numbers are printed beside split MNIST: Hsu et al. (2018),
"Re-evaluating continual learning scenarios" (MLP 2x400, Adam 1e-3, 4 epochs,
batch 128, mean over 10 runs), in percent.

``--summary`` prints instead one table with a row per method and a column per
benchmark (test accuracy at the chosen point), split MNIST read from ``--results``
and permuted MNIST from ``--permuted-results``.

Example::

    python benchmarks/accuracy_table.py --results benchmarks/results
    python benchmarks/accuracy_table.py --summary --permuted-results benchmarks/results/permuted_1epoch_full
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# Hsu et al. (2018): average accuracy (%) after 5 experiences of split MNIST.
HSU_2018 = {
    "split_mnist/task": {
        "naive": 97.98,
        "ewc": 97.70,
        "online_ewc": 98.04,
        "synaptic_intelligence": 98.56,
        "mas": 99.22,
        "lwf": 99.60,
        "joint": 99.52,
    },
    "split_mnist/domain": {
        "naive": 63.20,
        "ewc": 58.85,
        "online_ewc": 57.33,
        "synaptic_intelligence": 64.76,
        "mas": 68.57,
        "lwf": 71.02,
        "joint": 98.59,
    },
    "split_mnist/class": {
        "naive": 19.46,
        "ewc": 19.80,
        "online_ewc": 19.77,
        "synaptic_intelligence": 19.67,
        "mas": 19.52,
        "lwf": 24.17,
        "joint": 97.53,
    },
}
METHODS = (
    "naive",
    "joint",
    "ewc",
    "ewc_empirical",
    "ewc_sampled",
    "online_ewc",
    "synaptic_intelligence",
    "mas",
    "lwf",
    "flatness",
    "flatness_training",
)


def summarize(method_dir: Path) -> dict | None:
    """Return the chosen point, its test accuracies and the validation grid, or None if not tuned."""
    selection_path = method_dir / "selection.json"
    if selection_path.is_file():
        selection = json.loads(selection_path.read_text())
        chosen = selection["chosen"]
        grid = dict(zip(selection["grid"], selection["valid_acc"], strict=False))
    else:
        # Grid still running: show the points finished so far, choose nothing.
        grid = {}
        for point in sorted(p for p in method_dir.iterdir() if p.is_dir()):
            runs = sorted(point.glob("seed*.json"))
            if runs:
                grid[point.name] = json.loads(runs[0].read_text()).get("valid_acc")
        if not grid:
            return None
        chosen = None
    accuracies = []
    if chosen is not None:
        for path in sorted((method_dir / chosen).glob("seed*.json")):
            accuracies.append(json.loads(path.read_text())["acc"])
    return {"chosen": chosen, "grid": grid, "test": accuracies}


def format_accuracy(values: list[float]) -> str:
    if not values:
        return "—"
    mean = 100 * statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.2f} (1 seed)"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f} ({len(values)} seeds)"


def table(results: Path, benchmark: str) -> str:
    reference = HSU_2018.get(benchmark, {})
    lines = [
        f"#### {benchmark}",
        "",
        "| method | chosen on valid | valid acc per grid point (seed 0) | test acc % | Hsu et al. 2018 % |",
        "|---|---|---|---|---|",
    ]
    for method in METHODS:
        method_dir = results / benchmark / method
        summary = summarize(method_dir) if method_dir.is_dir() else None
        ref = reference.get(method.split("_empirical")[0].split("_sampled")[0])
        ref_text = f"{ref:.2f}" if ref is not None else "—"
        if summary is None:
            lines.append(f"| {method} | not run | — | — | {ref_text} |")
            continue
        grid = ", ".join(
            f"{point}: {value:.3f}" for point, value in summary["grid"].items() if value is not None
        )
        chosen = summary["chosen"] or "grid unfinished"
        lines.append(
            f"| {method} | {chosen} | {grid} | {format_accuracy(summary['test'])} | {ref_text} |"
        )
    return "\n".join(lines)


def summary(results: Path, permuted_results: Path) -> str:
    """Return one Markdown table: test accuracy per method (rows) and benchmark (columns)."""
    columns = [
        ("split_mnist/task", results),
        ("split_mnist/domain", results),
        ("split_mnist/class", results),
        ("permuted_mnist", permuted_results),
    ]
    lines = [
        "| method | " + " | ".join(name for name, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for method in METHODS:
        cells = []
        for benchmark, root in columns:
            method_dir = root / benchmark / method
            found = summarize(method_dir) if method_dir.is_dir() else None
            if found is None:
                cells.append("not run")
                continue
            reference = HSU_2018.get(benchmark, {}).get(method)
            text = format_accuracy(found["test"]) if found["test"] else "grid unfinished"
            if reference is not None:
                text += f" [{reference:.1f}]"
            cells.append(text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--permuted-results",
        type=Path,
        default=Path("benchmarks/results/permuted_1epoch_full"),
        help="results folder of permuted MNIST for --summary",
    )
    parser.add_argument("--summary", action="store_true", help="print one table of all benchmarks")
    args = parser.parse_args()
    if args.summary:
        print(summary(args.results, args.permuted_results))
        return
    benchmarks = ["split_mnist/task", "split_mnist/domain", "split_mnist/class", "permuted_mnist"]
    for benchmark in benchmarks:
        if (args.results / benchmark).is_dir():
            print(table(args.results, benchmark))
            print()
        else:
            print(f"#### {benchmark}\n\nnot run\n")


if __name__ == "__main__":
    main()
