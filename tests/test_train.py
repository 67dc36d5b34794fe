"""End-to-end runs of vsfcl-train on small slices of real MNIST."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from vsfcl.train import config_dir, format_table, run

QUICK = [
    "benchmark.train_samples=300",
    "benchmark.test_samples=100",
    "train_epochs=1",
    "batch_size=32",
    "progress_bar=false",
    "seed=0",
]
FLATNESS_QUICK = [
    "strategy.n_snapshots=6",
    "strategy.n_directions=3",
    "strategy.window_fraction=1.0",
    "strategy.profile_samples=64",
]


def _run(overrides, run_dir):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return run(cfg, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["naive", "joint", "ewc", "online_ewc", "flatness"])
@pytest.mark.parametrize("scenario", ["task", "class"])
def test_strategy_runs_on_split_mnist(mnist, tmp_path, strategy, scenario):
    overrides = [*QUICK, f"strategy={strategy}", f"benchmark.scenario={scenario}"]
    if strategy == "flatness":
        overrides += FLATNESS_QUICK
    results = _run(overrides, tmp_path)

    n_rows = 1 if strategy == "joint" else 5
    matrix = results["accuracy_matrix"]
    assert len(matrix) == n_rows
    assert all(len(row) == 5 for row in matrix)
    assert all(0.0 <= value <= 1.0 for row in matrix for value in row)
    assert len(results["valid_accuracy_matrix"]) == n_rows
    assert results["acc"] == pytest.approx(sum(matrix[-1]) / 5)
    assert len(results["train_seconds"]) == n_rows
    assert len(results["consolidation_seconds"]) == n_rows
    if strategy == "joint":
        assert results["bwt"] is None
    else:
        assert -1.0 <= results["bwt"] <= 1.0
    if strategy == "flatness":
        assert [c["experience"] for c in results["flatness"]] == [0, 1, 2, 3, 4]
        assert all(c["n_directions"] == 3 for c in results["flatness"])
    # Avalanche's CSV and TensorBoard logs.
    assert (tmp_path / "csv_logs" / "eval_results.csv").is_file()
    assert any((tmp_path / "tb_logs").iterdir())
    assert strategy in format_table([results])


@pytest.mark.slow
def test_permuted_mnist_flatness_variance_runs(mnist, tmp_path):
    overrides = [
        *QUICK,
        "benchmark=permuted_mnist",
        "benchmark.n_experiences=3",
        "strategy=flatness",
        "strategy.stiffness=variance",
        *FLATNESS_QUICK,
    ]
    results = _run(overrides, tmp_path)
    assert len(results["accuracy_matrix"]) == 3
    assert all(len(row) == 3 for row in results["accuracy_matrix"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant",
    [
        ["strategy.trajectory=training", "strategy.update=decoupled"],
        ["strategy.trajectory=sgd_probe", "strategy.max_directions=4"],
        ["strategy.trajectory=training", "strategy.remove_drift=true"],
    ],
)
def test_flatness_variants_run_end_to_end(mnist, tmp_path, variant):
    overrides = [
        *QUICK,
        "benchmark.scenario=task",
        "strategy=flatness",
        # At the default 1e5, the gradient rule with Adam can stop learning on data this
        # small (see BENCHMARKS.md), so a moderate strength tests the pipeline.
        "strategy.strength=100",
        *FLATNESS_QUICK,
        *variant,
    ]
    results = _run(overrides, tmp_path)
    assert results["complete"] is True
    # Learning still happens: right after training, the two-digit experiences are
    # classified better than the 50% of guessing on average (nine steps each are too
    # few for every one of them to be).
    diagonal = [results["accuracy_matrix"][i][i] for i in range(5)]
    assert sum(diagonal) / 5 > 0.6, diagonal
    assert [record["experience"] for record in results["flatness"]] == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_same_seed_gives_same_results(mnist, tmp_path):
    overrides = [*QUICK, "strategy=flatness", *FLATNESS_QUICK]
    first = _run(overrides, tmp_path / "a")
    second = _run(overrides, tmp_path / "b")
    assert first["accuracy_matrix"] == second["accuracy_matrix"]
    assert [c["stiffness"] for c in first["flatness"]] == [
        c["stiffness"] for c in second["flatness"]
    ]


@pytest.mark.slow
def test_cli_sweep_writes_results_and_summary(mnist, tmp_path):
    command = [
        sys.executable,
        "-m",
        "vsfcl.train",
        "-m",
        "strategy=naive,ewc",
        *QUICK,
        "eval_valid=false",
        f"hydra.sweep.dir={tmp_path}",
    ]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ}
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    results = sorted(Path(tmp_path).glob("*/results.json"))
    assert len(results) == 2
    strategies = {json.loads(p.read_text())["strategy"] for p in results}
    assert strategies == {"naive", "ewc"}
    assert "sweep summary" in completed.stdout
    assert "naive" in completed.stdout
    assert "ewc" in completed.stdout


@pytest.mark.slow
def test_cli_rejects_unknown_strategy(tmp_path):
    command = [sys.executable, "-m", "vsfcl.train", "strategy=si", f"hydra.run.dir={tmp_path}"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0
    assert "strategy" in completed.stderr
    assert "si" in completed.stderr
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_flatness_penalty_logged_to_tensorboard(mnist, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run([*QUICK, "strategy=flatness", *FLATNESS_QUICK], tmp_path)
    events = EventAccumulator(str(tmp_path / "tb_logs"))
    events.Reload()
    penalties = [event.value for event in events.Scalars("flatness/penalty")]
    # No penalty during the first experience, a positive one once a subspace is stored.
    assert penalties[0] == 0.0
    assert max(penalties) > 0.0


def test_num_threads_validated(tmp_path):
    with pytest.raises(Exception, match="num_threads=0 is invalid"):
        _run([*QUICK, "num_threads=0"], tmp_path)


@pytest.mark.slow
def test_sweep_summary_orders_jobs_and_shows_overrides(tmp_path):
    from vsfcl.sweep import collect_results

    for job, strength in ((10, "1"), (2, "3")):
        run_dir = tmp_path / str(job)
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(
            f"- strategy.ewc_lambda={strength}\n- hydra.run.dir=x\n"
        )
        result = {
            "strategy": "ewc",
            "benchmark": "b",
            "seed": 0,
            "acc": 0.5,
            "bwt": None,
            "forgetting": None,
            "train_seconds": [1.0],
            "consolidation_seconds": [0.0],
        }
        (run_dir / "results.json").write_text(json.dumps(result))
    results, skipped = collect_results(tmp_path)
    assert skipped == []
    assert [r["overrides"] for r in results] == [
        ["strategy.ewc_lambda=3"],
        ["strategy.ewc_lambda=1"],
    ]
    table = format_table(results)
    assert "overrides" in table.splitlines()[0]
    assert table.index("strategy.ewc_lambda=3") < table.index("strategy.ewc_lambda=1")
