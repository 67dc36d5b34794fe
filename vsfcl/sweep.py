"""Hydra callback that prints every run of a ``-m`` sweep side by side."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def _job_order(path: Path) -> tuple[int, int, str]:
    """Sort Hydra job folders 0, 1, 2, ..., 10 by number, other folders after them by path."""
    name = path.parent.name
    return (0, int(name), "") if name.isdigit() else (1, 0, str(path))


def _job_overrides(run_dir: Path) -> list[str]:
    """Return the command-line overrides Hydra recorded for a job, without ``hydra.*`` keys."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    overrides = OmegaConf.load(path)
    return [str(item) for item in overrides if not str(item).startswith("hydra.")]


def collect_results(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Read every ``results.json`` below ``sweep_dir`` in job order.

    Returns the results, each with the job's ``overrides`` added, and the skipped paths.
    """
    results, skipped = [], []
    for path in sorted(sweep_dir.glob("**/results.json"), key=_job_order):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            skipped.append(f"{path} ({error})")
            continue
        result["overrides"] = _job_overrides(path.parent)
        results.append(result)
    return results, skipped


class SweepSummary(Callback):
    """At the end of a multirun, print accuracy, BWT, forgetting and time of every job."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from vsfcl.train import format_table

        sweep_dir = Path(config.hydra.sweep.dir)
        results, skipped = collect_results(sweep_dir)
        for path in skipped:
            log.warning("skipped unreadable result %s", path)
        if not results:
            log.warning("no results.json found under %s", sweep_dir)
            return
        print(f"\nsweep summary ({sweep_dir}):")
        print(format_table(results))
