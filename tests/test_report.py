"""vsfcl-report on real training runs (2 strategies x 2 seeds) and on broken run folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from vsfcl.report import TrainingRun, collect_runs, group_runs, main, write_report

TINY = [
    "benchmark.train_samples=200",
    "benchmark.test_samples=50",
    "train_epochs=1",
    "batch_size=32",
    "progress_bar=false",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep_dir(mnist, tmp_path_factory) -> Path:
    """A real vsfcl-train sweep: naive and EWC, seeds 0 and 1, on a slice of MNIST."""
    sweep = tmp_path_factory.mktemp("runs") / "sweep"
    command = [
        sys.executable, "-m", "vsfcl.train", "-m",
        "strategy=naive,ewc", "seed=0,1", *TINY, f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return sweep


@pytest.fixture()
def broken_dir(tmp_path) -> Path:
    """Run folders the report must skip, one per reason."""
    root = tmp_path / "broken"
    cases = {
        "incomplete": json.dumps(
            {"complete": False, "error": "RuntimeError: out of memory", "accuracy_matrix": [[0.5]]}
        ),
        "truncated": '{"strategy": "naive", "accu',
        "fields": json.dumps({"strategy": "naive", "seed": 0}),
        "ragged": json.dumps(
            {
                "strategy": "naive",
                "benchmark": "b",
                "seed": 0,
                "acc": 0.5,
                "config": {},
                "accuracy_matrix": [[0.5, 0.5], [0.5]],
                "train_seconds": [1.0],
                "consolidation_seconds": [0.0],
            }
        ),  # fmt: skip
        "list": "[1, 2, 3]",
    }
    for name, text in cases.items():
        (root / name).mkdir(parents=True)
        (root / name / "results.json").write_text(text)
    return root


@pytest.fixture()
def landscape_dir(tmp_path) -> Path:
    """A landscape run folder with a summary.json of planted values and one figure."""
    run = tmp_path / "landscape" / "0"
    run.mkdir(parents=True)
    flatness = np.linspace(1.0, 3.0, 10)
    summary = {
        "gamma": 2.5,
        "n90": 35,
        "psi": 4.0,
        "psi_ci": [3.5, 4.5],
        "n_directions": 10,
        "n_censored": 1,
        "variance": (flatness**-4.0).tolist(),
        "flatness": [*flatness[:-1].tolist(), None],
        "psi_fit": {"pearson_r": -0.99},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    figure = Figure()
    figure.subplots().plot([1, 2], [2, 1])
    figure.savefig(run / "variance_flatness.png")
    (tmp_path / "landscape" / "1").mkdir()
    (tmp_path / "landscape" / "1" / "summary.json").write_text(json.dumps({"psi": 4.0}))
    return tmp_path / "landscape"


def _table_row(report: str, first_cell: str) -> list[str]:
    for line in report.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r} in the report")


def test_report_groups_seeds(sweep_dir, tmp_path):
    report = write_report([sweep_dir], tmp_path / "out").read_text()

    for strategy in ("naive", "ewc"):
        runs = [json.loads(p.read_text()) for p in sweep_dir.glob("*/results.json")]
        accuracies = np.array([r["acc"] for r in runs if r["strategy"] == strategy])
        row = _table_row(report, strategy)
        assert row[2] == "0, 1"
        assert row[3] == f"{accuracies.mean():.4f} ± {accuracies.std(ddof=1):.4f}"
    assert "Skipped runs" in report
    assert "None." in report


def test_report_writes_figures(sweep_dir, tmp_path):
    output = tmp_path / "out"
    report = write_report([sweep_dir], output).read_text()

    for name in ("accuracy_over_training.png", "accuracy_matrices.png", "time.png"):
        figure = output / "figures" / name
        assert f"](figures/{name})" in report
        assert figure.read_bytes()[:8] == PNG_SIGNATURE
        assert figure.stat().st_size > 10_000


def test_report_lists_skipped_runs(sweep_dir, broken_dir, tmp_path):
    report = write_report([sweep_dir, broken_dir], tmp_path / "out").read_text()

    assert "4 training runs, 0 landscape runs, 5 skipped." in report
    assert (
        "incomplete/results.json`: incomplete (complete: false): RuntimeError: out of memory"
        in report
    )
    assert "truncated/results.json`: invalid JSON" in report
    assert "fields/results.json`: missing fields: benchmark, accuracy_matrix, acc" in report
    assert "ragged/results.json`: invalid accuracy_matrix: rows have lengths [1, 2]" in report
    assert "list/results.json`: invalid content: expected a JSON object" in report


def test_report_landscape_runs(landscape_dir, tmp_path):
    output = tmp_path / "out"
    report = write_report([landscape_dir], output).read_text()

    row = _table_row(report, "landscape/0")
    assert row[1:] == ["4.00", "[3.50, 4.50]", "-0.99", "2.50", "35", "1/10"]
    assert (output / "landscape" / "landscape_0" / "variance_flatness.png").is_file()
    assert "](landscape/landscape_0/variance_flatness.png)" in report
    assert (output / "figures" / "landscape_variance_flatness.png").is_file()
    assert (
        "landscape/1/summary.json`: missing fields: gamma, n90, psi_ci, n_directions, n_censored"
        in report
    )


def test_report_same_folder_twice(sweep_dir, tmp_path):
    collection = collect_runs([sweep_dir, sweep_dir / "0"])

    assert len(collection.training) == 4


def _run(name: str, config: dict, seed: int, rows: int = 2) -> TrainingRun:
    results = {
        "strategy": config["strategy"]["name"],
        "benchmark": "b",
        "seed": seed,
        "config": {**config, "seed": seed},
    }
    return TrainingRun(name=name, path=Path(name), results=results, matrix=np.full((rows, 2), 0.5))


def test_grouping_labels_differing_keys():
    ewc_small = {"strategy": {"name": "ewc", "ewc_lambda": 1.0}, "data_root": "/a"}
    ewc_large = {"strategy": {"name": "ewc", "ewc_lambda": 100.0}, "data_root": "/b"}
    naive = {"strategy": {"name": "naive"}, "data_root": "/a"}
    runs = [
        _run("a", ewc_small, 0),
        _run("b", ewc_small, 1),
        _run("c", ewc_large, 0),
        _run("d", naive, 0),
    ]

    groups = group_runs(runs)

    assert sorted(group.label for group in groups) == [
        "ewc strategy.ewc_lambda=1.0",
        "ewc strategy.ewc_lambda=100.0",
        "naive",
    ]
    assert [group.seeds for group in groups if group.label == "ewc strategy.ewc_lambda=1.0"] == [
        [0, 1]
    ]


def test_grouping_splits_matrix_shapes():
    config = {"strategy": {"name": "naive"}}
    groups = group_runs([_run("a", config, 0, rows=2), _run("b", config, 1, rows=1)])

    assert len(groups) == 2


def test_cli_missing_folder(tmp_path, caplog):
    status = main([str(tmp_path / "absent"), "--output", str(tmp_path / "out")])

    assert status == 2
    assert "does not exist" in caplog.text


def test_cli_writes_report(sweep_dir, tmp_path):
    output = tmp_path / "cli"
    completed = subprocess.run(
        [
            str(Path(sys.executable).parent / "vsfcl-report"),
            str(sweep_dir),
            "--output",
            str(output),
            "--ignore-key",
            "device",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == str(output / "report.md")
    assert (output / "report.md").is_file()
