"""Collect the summary.json files of a vsfcl-landscape multirun into a Markdown table.

    python benchmarks/landscape_table.py multirun/landscape_sweep > table.md

One row per job folder (a numbered subfolder holding summary.json), sorted by job
number: optimizer, minibatch size B, learning rate, psi with its bootstrap interval,
the Pearson correlation of log variance and log flatness, gamma, n90, censored
directions, L0, the exploration-phase outcome and the run time. Jobs without a
summary.json (failed or still running) are listed as missing on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _number(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _interval(interval: Any) -> str:
    if not interval or None in interval:
        return "n/a"
    return f"[{interval[0]:.2f}, {interval[1]:.2f}]"


def _optimizer_options(job: Path) -> dict[str, Any]:
    """Read the optimizer's options (lr, momentum, ...) from the job's composed Hydra config."""
    from omegaconf import OmegaConf

    config_path = job / ".hydra" / "config.yaml"
    if not config_path.is_file():
        return {}
    config = OmegaConf.load(config_path)
    return OmegaConf.to_container(config.optimizer, resolve=True)  # type: ignore[return-value]


def table_row(summary: dict[str, Any], optimizer_options: dict[str, Any]) -> str:
    """Format one job's summary as a Markdown table row."""
    settings = summary["settings"]
    optimizer = settings["optimizer_name"].rsplit(".", 1)[-1]
    if optimizer_options.get("momentum"):
        optimizer += f" (momentum {optimizer_options['momentum']})"
    learning_rate = optimizer_options.get("lr")
    psi_fit = summary.get("psi_fit") or {}
    exploration = summary["exploration"]
    reached = f"epoch {exploration['epoch']}" if exploration["reached"] else "not reached"
    cells = [
        optimizer,
        str(settings["training"]["batch_size"]),
        _number(learning_rate, 3) if learning_rate is not None else "n/a",
        _number(summary["psi"]),
        _interval(summary["psi_ci"]),
        _number(psi_fit.get("pearson_r")),
        _number(summary["gamma"]),
        _number(summary["n90"]),
        f"{summary['n_censored']}/{summary['n_directions']}",
        f"{summary['loss0']:.2e}",
        reached,
        f"{summary['timing']['total_seconds']:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| optimizer | B | lr | psi | psi 95% CI | r(log sigma^2, log F) | gamma | n90 | censored | L0 "
    "| exploration | seconds |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def collect(sweep_dir: Path) -> tuple[str, list[Path]]:
    """Return the table for the jobs under ``sweep_dir`` and the job folders without a summary."""
    if not sweep_dir.is_dir():
        raise FileNotFoundError(
            f"sweep folder {sweep_dir} not found; pass the multirun folder of a sweep"
        )
    jobs = sorted(
        (path for path in sweep_dir.iterdir() if path.is_dir() and path.name.isdigit()),
        key=lambda path: int(path.name),
    )
    rows, missing = [], []
    for job in jobs:
        summary_path = job / "summary.json"
        if not summary_path.is_file():
            missing.append(job)
            continue
        rows.append(table_row(json.loads(summary_path.read_text()), _optimizer_options(job)))
    return "\n".join([HEADER, *rows]), missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="multirun folder holding numbered job folders")
    arguments = parser.parse_args()
    try:
        table, missing = collect(arguments.sweep_dir)
    except FileNotFoundError as error:
        parser.exit(1, f"error: {error}\n")
    print(table)
    for job in missing:
        print(f"missing: {job / 'summary.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
