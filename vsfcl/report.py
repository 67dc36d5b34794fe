"""``vsfcl-report``: a Markdown report with figures over finished runs.

Reads every ``results.json`` (written by ``vsfcl-train``) and ``summary.json``
(written by ``vsfcl-landscape``) below the given folders and writes ``report.md``
with PNG figures into the output folder::

    vsfcl-report multirun/2026-12-04/20-01-45 outputs --output report

Training runs are grouped by their resolved config without the seed and the keys in
:data:`IGNORED_CONFIG_KEYS`, so the seeds of one setting form one group, reported as
mean ± sample standard deviation over seeds. Runs that cannot be used (incomplete,
unreadable, missing fields) are listed in the report with the reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.json"

# Config keys that do not change what a run measures (paths, resuming, the progress
# bar), left out of the grouping like the seed. Extend with --ignore-key.
IGNORED_CONFIG_KEYS = (
    "seed",
    "data_root",
    "progress_bar",
    "resume",
    "keep_checkpoint",
    "num_threads",
    "wandb",
)

_RESULTS_FIELDS = (
    "strategy",
    "benchmark",
    "seed",
    "accuracy_matrix",
    "acc",
    "train_seconds",
    "consolidation_seconds",
    "config",
)
_SUMMARY_FIELDS = ("gamma", "n90", "psi", "psi_ci", "n_directions", "n_censored")


class RunError(ValueError):
    """A run folder that the report cannot use; the message is the reason."""


@dataclass
class TrainingRun:
    """One ``vsfcl-train`` run: its folder name in the report and its results."""

    name: str
    path: Path
    results: dict[str, Any]
    matrix: np.ndarray  # (n_rows, n_experiences); NaN where an entry is null

    @property
    def flat_config(self) -> dict[str, Any]:
        return flatten_config(self.results["config"])


@dataclass
class RunGroup:
    """Training runs that differ only in the seed (and in ignored keys)."""

    key: str
    runs: list[TrainingRun] = field(default_factory=list)
    label: str = ""

    @property
    def seeds(self) -> list[int]:
        return sorted(int(run.results["seed"]) for run in self.runs)

    def values(self, metric: str) -> np.ndarray:
        """Return the non-null values of a scalar metric over the seeds."""
        values = [run.results.get(metric) for run in self.runs]
        return np.asarray([v for v in values if isinstance(v, (int, float))], dtype=float)

    def seconds(self, metric: str) -> np.ndarray:
        """Return the total of a per-experience time list for each seed, in seconds."""
        return np.asarray([float(sum(run.results[metric])) for run in self.runs])

    def matrices(self) -> np.ndarray:
        """Return the stacked accuracy matrices, shape (n_seeds, n_rows, n_experiences)."""
        return np.stack([run.matrix for run in self.runs])


@dataclass
class LandscapeRun:
    """One ``vsfcl-landscape`` run: its folder name, folder and summary."""

    name: str
    path: Path
    summary: dict[str, Any]


@dataclass
class Collection:
    """Everything found below the input folders."""

    training: list[TrainingRun] = field(default_factory=list)
    landscape: list[LandscapeRun] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


# ---------------------------------------------------------------- reading runs


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted keys (``strategy.ewc_lambda``); lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise RunError(f"unreadable: {error}") from error
    except json.JSONDecodeError as error:
        raise RunError(f"invalid JSON: {error}") from error
    if not isinstance(data, dict):
        raise RunError(f"invalid content: expected a JSON object, found {type(data).__name__}")
    return data


def _accuracy_matrix(value: Any) -> np.ndarray:
    """Convert ``accuracy_matrix`` to floats; null entries become NaN."""
    if not isinstance(value, list) or not value or not all(isinstance(row, list) for row in value):
        raise RunError("invalid accuracy_matrix: expected a non-empty list of rows")
    widths = {len(row) for row in value}
    if len(widths) != 1 or 0 in widths:
        raise RunError(f"invalid accuracy_matrix: rows have lengths {sorted(widths)}")
    entries = [entry for row in value for entry in row]
    if not all(
        entry is None or (isinstance(entry, (int, float)) and not isinstance(entry, bool))
        for entry in entries
    ):
        raise RunError("invalid accuracy_matrix: entries must be numbers or null")
    return np.asarray([[math.nan if e is None else float(e) for e in row] for row in value])


def read_training_run(path: Path, name: str) -> TrainingRun:
    """Read and check one ``results.json``; raise :class:`RunError` with the reason to skip it."""
    results = _read_json(path)
    if results.get("complete") is False:
        error = results.get("error")
        raise RunError("incomplete (complete: false)" + (f": {error}" if error else ""))
    missing = [key for key in _RESULTS_FIELDS if key not in results]
    if missing:
        raise RunError(f"missing fields: {', '.join(missing)}")
    if not isinstance(results["config"], dict):
        raise RunError("invalid config: expected a JSON object")
    for key in ("train_seconds", "consolidation_seconds"):
        times = results[key]
        if not isinstance(times, list) or not all(isinstance(t, (int, float)) for t in times):
            raise RunError(f"invalid {key}: expected a list of numbers")
    return TrainingRun(
        name=name, path=path, results=results, matrix=_accuracy_matrix(results["accuracy_matrix"])
    )


def read_landscape_run(path: Path, name: str) -> LandscapeRun:
    """Read and check one ``summary.json``; raise :class:`RunError` with the reason to skip it."""
    summary = _read_json(path)
    missing = [key for key in _SUMMARY_FIELDS if key not in summary]
    if missing:
        raise RunError(f"missing fields: {', '.join(missing)}")
    return LandscapeRun(name=name, path=path, summary=summary)


def _run_name(path: Path, root: Path) -> str:
    relative = path.parent.relative_to(root)
    return root.name if str(relative) == "." else f"{root.name}/{relative.as_posix()}"


def collect_runs(directories: Sequence[Path]) -> Collection:
    """Find and read every run below ``directories``; unusable ones go to ``skipped``."""
    collection = Collection()
    seen: set[Path] = set()
    for root in directories:
        if not root.is_dir():
            raise FileNotFoundError(f"run folder {root} does not exist or is not a folder")
        for path in _new_files(root, RESULTS_FILE, seen):
            try:
                collection.training.append(read_training_run(path, _run_name(path, root)))
            except RunError as error:
                _skip(collection, path, error)
        for path in _new_files(root, SUMMARY_FILE, seen):
            try:
                collection.landscape.append(read_landscape_run(path, _run_name(path, root)))
            except RunError as error:
                _skip(collection, path, error)
    return collection


def _new_files(root: Path, filename: str, seen: set[Path]) -> list[Path]:
    """Return the files named ``filename`` below ``root`` not seen through another folder."""
    found = []
    for path in sorted(root.rglob(filename)):
        if path.resolve() not in seen:
            seen.add(path.resolve())
            found.append(path)
    return found


def _skip(collection: Collection, path: Path, error: RunError) -> None:
    log.warning("skipped %s: %s", path, error)
    collection.skipped.append((str(path), str(error)))


# ---------------------------------------------------------------- grouping


def group_runs(
    runs: Sequence[TrainingRun], ignored_keys: Sequence[str] = IGNORED_CONFIG_KEYS
) -> list[RunGroup]:
    """Group runs whose flattened configs agree on every key outside ``ignored_keys``.

    Each group's ``label`` names the config values that tell the groups apart. A run
    whose accuracy matrix has another shape than the first run of its group cannot be
    averaged with it, so it gets a group of its own.
    """
    ignored = set(ignored_keys)
    groups: dict[str, RunGroup] = {}
    for run in runs:
        config = {k: v for k, v in run.flat_config.items() if k not in ignored}
        key = json.dumps(config, sort_keys=True, default=str)
        group = groups.setdefault(key, RunGroup(key=key))
        if group.runs and group.runs[0].matrix.shape != run.matrix.shape:
            key = f"{key}#shape{run.matrix.shape}"
            group = groups.setdefault(key, RunGroup(key=key))
        group.runs.append(run)
    ordered = sorted(
        groups.values(),
        key=lambda g: (g.runs[0].results["benchmark"], g.runs[0].results["strategy"], g.key),
    )
    _label_groups(ordered, ignored)
    return ordered


def _label_groups(groups: list[RunGroup], ignored: set[str]) -> None:
    configs = [{k: v for k, v in g.runs[0].flat_config.items() if k not in ignored} for g in groups]
    keys = sorted({k for c in configs for k in c} - {"strategy.name"})
    # A key names a difference only among the groups that have it: strategy.ewc_lambda
    # separates two EWC groups but does not apply to a naive one.
    differing = [
        k
        for k in keys
        if len({json.dumps(c[k], sort_keys=True, default=str) for c in configs if k in c}) > 1
    ]
    for group, config in zip(groups, configs, strict=True):
        parts = [str(config.get("strategy.name", group.runs[0].results["strategy"]))]
        parts += [f"{k}={config.get(k)}" for k in differing if k in config]
        group.label = " ".join(parts)


# ---------------------------------------------------------------- figures


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _grid(n_panels: int, max_columns: int = 3) -> tuple[int, int]:
    columns = min(n_panels, max_columns)
    return math.ceil(n_panels / columns), columns


def plot_accuracy_over_training(groups: Sequence[RunGroup], path: Path) -> Path | None:
    """Draw accuracy on each experience after each training phase, one panel per group.

    Each line is one experience, from the phase that trained it onwards, as the mean
    over seeds with a band of ± one standard deviation. Groups with a single phase
    (joint training) have no course to draw and are left out.
    """
    sequential = [g for g in groups if g.runs[0].matrix.shape[0] > 1]
    if not sequential:
        return None
    n_rows, n_columns = _grid(len(sequential))
    figure = Figure(figsize=(4.2 * n_columns, 3.2 * n_rows))
    axes = figure.subplots(n_rows, n_columns, squeeze=False, sharey=True)
    for axis, group in zip(axes.flat, sequential, strict=False):
        matrices = group.matrices()
        mean, std = np.nanmean(matrices, axis=0), np.nanstd(matrices, axis=0)
        phases = np.arange(matrices.shape[1])
        for experience in range(matrices.shape[2]):
            shown = phases >= min(experience, phases[-1])
            line = axis.plot(
                phases[shown],
                mean[shown, experience],
                marker="o",
                markersize=3,
                label=f"exp {experience}",
            )
            axis.fill_between(
                phases[shown],
                (mean - std)[shown, experience],
                (mean + std)[shown, experience],
                color=line[0].get_color(),
                alpha=0.15,
            )
        axis.set_title(f"{group.label} (n={len(group.runs)})", fontsize=9)
        axis.set_xlabel("after training experience")
        axis.set_xticks(phases)
        axis.set_ylim(0.0, 1.02)
        axis.grid(alpha=0.3)
    for axis in axes[:, 0]:
        axis.set_ylabel("test accuracy")
    for axis in list(axes.flat)[len(sequential) :]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize=7, loc="lower left")
    return _save(figure, path)


def plot_accuracy_matrices(groups: Sequence[RunGroup], path: Path) -> Path:
    """Draw the mean accuracy matrix of each group as an annotated heatmap."""
    n_rows, n_columns = _grid(len(groups))
    figure = Figure(figsize=(3.8 * n_columns, 3.4 * n_rows))
    axes = figure.subplots(n_rows, n_columns, squeeze=False)
    image = None
    for axis, group in zip(axes.flat, groups, strict=False):
        mean = np.nanmean(group.matrices(), axis=0)
        image = axis.imshow(mean, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(mean):
            colour = "black" if value > 0.6 else "white"
            axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
        axis.set_title(f"{group.label} (n={len(group.runs)})", fontsize=9)
        axis.set_xlabel("tested on experience")
        axis.set_ylabel("after training" if mean.shape[0] > 1 else "after joint training")
        axis.set_xticks(range(mean.shape[1]))
        axis.set_yticks(range(mean.shape[0]))
    for axis in list(axes.flat)[len(groups) :]:
        axis.set_visible(False)
    if image is not None:
        figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="test accuracy")
    return _save(figure, path)


def plot_times(groups: Sequence[RunGroup], path: Path) -> Path:
    """Draw training and consolidation seconds per group as stacked bars, mean ± std over seeds."""
    labels = [group.label for group in groups]
    train = [group.seconds("train_seconds") for group in groups]
    consolidation = [group.seconds("consolidation_seconds") for group in groups]
    positions = np.arange(len(groups))

    figure = Figure(figsize=(max(4.0, 1.1 * len(groups) + 2.0), 3.6))
    axis = figure.subplots()
    train_mean = np.array([t.mean() for t in train])
    consolidation_mean = np.array([c.mean() for c in consolidation])
    axis.bar(
        positions,
        train_mean,
        yerr=[t.std(ddof=1) if t.size > 1 else 0.0 for t in train],
        label="training",
        capsize=3,
    )
    axis.bar(
        positions,
        consolidation_mean,
        bottom=train_mean,
        yerr=[c.std(ddof=1) if c.size > 1 else 0.0 for c in consolidation],
        label="consolidation",
        capsize=3,
    )

    axis.set_xticks(positions)
    axis.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    axis.set_ylabel("seconds per run (all experiences)")
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def plot_landscape_variance_flatness(runs: Sequence[LandscapeRun], path: Path) -> Path | None:
    """Overlay variance against flatness of every landscape run on log-log axes."""
    figure = Figure(figsize=(5.0, 4.0))
    axis = figure.subplots()
    drawn = 0
    for run in runs:
        variance, flatness = run.summary.get("variance"), run.summary.get("flatness")
        if not isinstance(variance, list) or not isinstance(flatness, list):
            continue
        pairs = [
            (f, v)
            for v, f in zip(variance, flatness, strict=False)
            if isinstance(v, (int, float)) and isinstance(f, (int, float)) and v > 0 and f > 0
        ]
        if not pairs:
            continue
        x, y = zip(*pairs, strict=True)
        psi = run.summary.get("psi")
        suffix = f" (psi={psi:.2f})" if isinstance(psi, (int, float)) else ""
        axis.scatter(x, y, s=8, alpha=0.7, label=f"{run.name}{suffix}")
        drawn += 1
    if drawn == 0:
        return None
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel(r"flatness $F_i$ (weight units)")
    axis.set_ylabel(r"variance $\sigma_i^2$")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3, which="both")
    return _save(figure, path)


# ---------------------------------------------------------------- Markdown


def _mean_std(values: np.ndarray, digits: int = 4) -> str:
    if values.size == 0:
        return "n/a"
    if values.size == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def _number(value: Any, digits: int = 2) -> str:
    if isinstance(value, bool) or value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def _accuracy_section(groups: Sequence[RunGroup]) -> list[str]:
    rows = []
    for group in groups:
        first = group.runs[0].results
        rows.append(
            [
                group.label,
                str(first["benchmark"]),
                ", ".join(str(s) for s in group.seeds),
                _mean_std(group.values("acc")),
                _mean_std(group.values("bwt")),
                _mean_std(group.values("forgetting")),
                _mean_std(group.values("valid_acc")),
                _mean_std(group.seconds("train_seconds"), 1),
                _mean_std(group.seconds("consolidation_seconds"), 1),
            ]
        )
    header = [
        "group",
        "benchmark",
        "seeds",
        "acc",
        "bwt",
        "forgetting",
        "valid acc",
        "train s",
        "consolidation s",
    ]
    return [
        "## Accuracy",
        "",
        "Mean ± sample standard deviation (ddof = 1) over the seeds of each group; a single "
        "seed shows its value alone. `acc` is the mean test accuracy after the last "
        "experience, `bwt` the backward transfer and `forgetting` the mean drop from each "
        "experience's best accuracy (n/a for joint training). Times are summed over experiences.",
        "",
        *_table(header, rows),
        "",
    ]


def _landscape_section(runs: Sequence[LandscapeRun], output: Path) -> list[str]:
    rows = []
    for run in runs:
        summary = run.summary
        psi_ci = summary.get("psi_ci")
        interval = (
            f"[{psi_ci[0]:.2f}, {psi_ci[1]:.2f}]"
            if isinstance(psi_ci, list)
            and len(psi_ci) == 2
            and all(isinstance(v, (int, float)) for v in psi_ci)
            else "n/a"
        )
        psi_fit = summary.get("psi_fit")
        if not isinstance(psi_fit, dict):
            psi_fit = {}
        rows.append(
            [
                run.name,
                _number(summary.get("psi")),
                interval,
                _number(psi_fit.get("pearson_r")),
                _number(summary.get("gamma")),
                _number(summary.get("n90")),
                f"{_number(summary.get('n_censored'))}/{_number(summary.get('n_directions'))}",
            ]
        )
    header = ["run", "psi", "psi CI", "r(log sigma^2, log F)", "gamma", "n90", "censored"]
    lines = [
        "## Landscape runs",
        "",
        "psi is the exponent of the fit sigma_i^2 ~ F_i^-psi with its bootstrap interval, "
        "gamma the exponent of the variance spectrum sigma_i^2 ~ i^-gamma and n90 the number "
        "of components that hold 90% of the variance without the first one.",
        "",
        *_table(header, rows),
        "",
    ]
    overlay = plot_landscape_variance_flatness(
        runs, output / "figures" / "landscape_variance_flatness.png"
    )
    if overlay is not None:
        lines += [
            "![variance against flatness, all runs](figures/landscape_variance_flatness.png)",
            "",
        ]
    for run in runs:
        copied = _copy_landscape_figures(run, output)
        if not copied:
            continue
        lines.append(f"### {run.name}")
        lines.append("")
        for relative in copied:
            if relative.name == "variance_flatness.png":
                lines += [f"![variance against flatness, {run.name}]({relative.as_posix()})", ""]
        lines.append("Figures: " + ", ".join(f"[{p.stem}]({p.as_posix()})" for p in copied))
        lines.append("")
    return lines


def _copy_landscape_figures(run: LandscapeRun, output: Path) -> list[Path]:
    """Copy a landscape run's PNGs next to the report; return their paths relative to it."""
    target = Path("landscape") / run.name.replace("/", "_")
    copied = []
    for source in sorted(run.path.parent.glob("*.png")):
        destination = output / target / source.name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
        copied.append(target / source.name)
    return copied


def _runs_section(groups: Sequence[RunGroup]) -> list[str]:
    rows = [
        [run.name, group.label, str(run.results["seed"]), _number(run.results.get("acc"), 4)]
        for group in groups
        for run in sorted(group.runs, key=lambda r: int(r.results["seed"]))
    ]
    return ["## Runs", "", *_table(["run", "group", "seed", "acc"], rows), ""]


def _skipped_section(skipped: Sequence[tuple[str, str]]) -> list[str]:
    lines = ["## Skipped runs", ""]
    if not skipped:
        return [*lines, "None.", ""]
    return [*lines, *[f"- `{path}`: {reason}" for path, reason in skipped], ""]


def write_report(
    directories: Sequence[Path], output: Path, ignored_keys: Sequence[str] = IGNORED_CONFIG_KEYS
) -> Path:
    """Collect the runs below ``directories`` and write ``report.md`` and figures to ``output``.

    Returns the path of ``report.md``. Raises ``FileNotFoundError`` for a missing
    input folder; a folder without any usable run still gets a report that lists
    what was skipped.
    """
    collection = collect_runs(directories)
    output.mkdir(parents=True, exist_ok=True)
    figures = output / "figures"
    lines = [
        "# vsfcl report",
        "",
        "Runs from: " + ", ".join(f"`{d}`" for d in directories),
        "",
        f"{len(collection.training)} training runs, {len(collection.landscape)} landscape runs, "
        f"{len(collection.skipped)} skipped.",
        "",
    ]

    if collection.training:
        groups = group_runs(collection.training, ignored_keys)
        lines += _accuracy_section(groups)
        over_training = plot_accuracy_over_training(groups, figures / "accuracy_over_training.png")
        if over_training is not None:
            lines += [
                "## Accuracy during training",
                "",
                "Test accuracy on each experience after each training phase, from the phase "
                "that trained it onwards (mean over seeds, band ± one standard deviation).",
                "",
                "![accuracy on each experience during training]"
                "(figures/accuracy_over_training.png)",
                "",
            ]
        plot_accuracy_matrices(groups, figures / "accuracy_matrices.png")
        lines += [
            "## Accuracy matrices",
            "",
            "Row i: after training experience i; column j: test accuracy on experience j "
            "(mean over seeds).",
            "",
            "![mean accuracy matrices](figures/accuracy_matrices.png)",
            "",
        ]
        plot_times(groups, figures / "time.png")
        lines += ["## Time", "", "![training and consolidation time](figures/time.png)", ""]
        lines += _runs_section(groups)

    if collection.landscape:
        lines += _landscape_section(collection.landscape, output)

    lines += _skipped_section(collection.skipped)
    report = output / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vsfcl-report",
        description=(
            "Write a Markdown report with PNG figures over the results.json (vsfcl-train) "
            "and summary.json (vsfcl-landscape) files found below the given folders."
        ),
    )
    parser.add_argument(
        "directories",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="run or sweep folder, searched recursively",
    )
    parser.add_argument(
        "--output",
        "-o",
        type=Path,
        default=Path("report"),
        help="folder for report.md and figures/ (default: report)",
    )
    parser.add_argument(
        "--ignore-key",
        action="append",
        default=[],
        metavar="KEY",
        help=(
            "dotted config key that does not split groups, e.g. device; repeatable. "
            f"Always ignored: {', '.join(IGNORED_CONFIG_KEYS)}"
        ),
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vsfcl-report``; return the exit status."""
    arguments = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = write_report(
            arguments.directories, arguments.output, (*IGNORED_CONFIG_KEYS, *arguments.ignore_key)
        )
    except FileNotFoundError as error:
        log.error("%s", error)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
