"""Hydra callback that prints every run of a ``-m`` sweep side by side."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def collect_results(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Read every ``results.json`` below ``sweep_dir``; return the results and the skipped paths."""
    results, skipped = [], []
    for path in sorted(sweep_dir.glob("**/results.json")):
        try:
            results.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as error:
            skipped.append(f"{path} ({error})")
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
