"""Checkpoints and resumed runs of vsfcl-train on tiny slices of real MNIST.

A run killed with SIGKILL in the middle of an experience and started again in the same
directory must end with the same ``results.json`` as an uninterrupted run, apart from
the timing fields.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from vsfcl.checkpoint import CHECKPOINT_FILE, CheckpointError
from vsfcl.train import RESULTS_FILE, config_dir, run
from vsfcl.validation import ConfigError

QUICK = [
    "benchmark.train_samples=200",
    "benchmark.test_samples=50",
    "train_epochs=1",
    "batch_size=32",
    "progress_bar=false",
    "seed=3",
]
STRATEGY_OVERRIDES = {
    "naive": ["strategy=naive"],
    "ewc": ["strategy=ewc", "strategy.ewc_lambda=100"],
    "flatness": [
        "strategy=flatness",
        "strategy.n_snapshots=4",
        "strategy.n_directions=2",
        "strategy.window_fraction=1.0",
        "strategy.profile_samples=32",
    ],
}

# Runs vsfcl-train and blocks in the third training minibatch drawn after the first
# checkpoint appears, that is in the middle of experience 1, after writing a marker file.
PAUSING_RUNNER = """
import sys, time
from pathlib import Path

import vsfcl.tensor_data as tensor_data

marker, run_dir = Path(sys.argv.pop(1)), Path(sys.argv.pop(1))
original_iter = tensor_data.TensorLoader.__iter__
drawn = 0

def pausing_iter(self):
    global drawn
    for batch in original_iter(self):
        if self.shuffle and (run_dir / "checkpoint.pt").exists():
            drawn += 1
            if drawn == 3:
                marker.write_text("paused")
                time.sleep(600)
        yield batch

tensor_data.TensorLoader.__iter__ = pausing_iter

from vsfcl.train import main

main()
"""

TIMING_KEYS = ("train_seconds", "consolidation_seconds")


def _compose(overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=overrides)


def _without_timing(results: dict) -> dict:
    """Drop the wall-clock fields, which differ between any two runs."""
    untimed = {key: value for key, value in results.items() if key not in TIMING_KEYS}
    if "flatness" in untimed:
        untimed["flatness"] = [
            {k: v for k, v in c.items() if k != "seconds"} for c in untimed["flatness"]
        ]
    return untimed


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def _kill_in_experience_one(tmp_path: Path, run_dir: Path, overrides: list[str]) -> None:
    """Start the CLI in ``run_dir``, wait until it is inside experience 1, then SIGKILL it."""
    runner = tmp_path / "pausing_runner.py"
    runner.write_text(PAUSING_RUNNER)
    marker = tmp_path / "paused"
    command = [
        sys.executable,
        str(runner),
        str(marker),
        str(run_dir),
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_environment()
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            if process.poll() is not None:
                output = process.stdout.read().decode(errors="replace")
                pytest.fail(
                    f"the run ended before pausing (exit code {process.returncode}):\n{output[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail("the run did not reach experience 1 within 180 s")
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    assert process.returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["naive", "ewc", "flatness"])
def test_killed_run_resumes_to_same_results(mnist, tmp_path, strategy):
    overrides = [*QUICK, *STRATEGY_OVERRIDES[strategy]]
    run_dir = tmp_path / "killed"
    _kill_in_experience_one(tmp_path, run_dir, overrides)
    assert (run_dir / CHECKPOINT_FILE).is_file()
    assert not (run_dir / RESULTS_FILE).exists()
    assert not list(run_dir.glob(".*.tmp"))

    if strategy == "naive":
        # Started again through the CLI, as a user would.
        command = [sys.executable, "-m", "vsfcl.train", *overrides, f"hydra.run.dir={run_dir}"]
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=300, env=_environment()
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        assert "resumed from" in completed.stdout
        resumed = json.loads((run_dir / RESULTS_FILE).read_text())
    else:
        resumed = run(_compose(overrides), run_dir)
        assert resumed == json.loads((run_dir / RESULTS_FILE).read_text())

    reference = run(_compose(overrides), tmp_path / "uninterrupted")
    assert resumed["complete"] is True
    assert len(resumed["accuracy_matrix"]) == 5
    assert _without_timing(resumed) == _without_timing(reference)
    assert len(resumed["train_seconds"]) == 5
    # A completed run removes its checkpoint unless keep_checkpoint=true.
    assert not (run_dir / CHECKPOINT_FILE).exists()


@pytest.mark.slow
def test_same_seed_gives_identical_results_json(mnist, tmp_path):
    overrides = [*QUICK, *STRATEGY_OVERRIDES["flatness"], "benchmark.n_experiences=2"]
    first = run(_compose(overrides), tmp_path / "a")
    second = run(_compose(overrides), tmp_path / "b")
    first_file = json.loads((tmp_path / "a" / RESULTS_FILE).read_text())
    second_file = json.loads((tmp_path / "b" / RESULTS_FILE).read_text())
    assert first_file == first
    assert _without_timing(first_file) == _without_timing(second_file)
    assert _without_timing(second_file) == _without_timing(second)


@pytest.mark.slow
def test_checkpoint_loads_with_weights_only(mnist, tmp_path):
    overrides = [
        *QUICK,
        *STRATEGY_OVERRIDES["flatness"],
        "benchmark.n_experiences=2",
        "keep_checkpoint=true",
    ]
    run(_compose(overrides), tmp_path)
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert len(state["matrices"]["test"]) == 2
    assert [s["experience"] for s in state["method_plugin"]["subspaces"]] == [0, 1]
    assert state["strategy"]["clock"]["train_exp_counter"] == 2
    assert set(state["rng"]) >= {"python", "numpy", "torch"}


@pytest.mark.slow
def test_finished_run_is_not_trained_again(mnist, tmp_path):
    overrides = [*QUICK, "strategy=naive", "benchmark.n_experiences=2"]
    first = run(_compose(overrides), tmp_path)
    written = (tmp_path / RESULTS_FILE).stat().st_mtime_ns
    again = run(_compose(overrides), tmp_path)
    assert again == first
    assert (tmp_path / RESULTS_FILE).stat().st_mtime_ns == written


@pytest.mark.slow
def test_finished_run_with_other_settings_is_an_error(mnist, tmp_path):
    run(_compose([*QUICK, "strategy=naive", "benchmark.n_experiences=2"]), tmp_path)
    with pytest.raises(
        ConfigError, match=r"contains a complete run with different settings \(seed: 3 -> 4\)"
    ):
        run(_compose([*QUICK, "strategy=naive", "benchmark.n_experiences=2", "seed=4"]), tmp_path)
    # resume=false replaces the old run.
    replaced = run(
        _compose([*QUICK, "strategy=naive", "benchmark.n_experiences=2", "seed=4", "resume=false"]),
        tmp_path,
    )
    assert replaced["seed"] == 4


@pytest.mark.slow
def test_checkpoint_with_other_settings_is_an_error(mnist, tmp_path):
    overrides = [*QUICK, "strategy=naive", "benchmark.n_experiences=2", "keep_checkpoint=true"]
    run(_compose(overrides), tmp_path)
    (tmp_path / RESULTS_FILE).unlink()
    changed = [*overrides, "optimizer.lr=0.01", "batch_size=16"]
    with pytest.raises(ConfigError, match=r"batch_size: 32 -> 16; optimizer.lr: 0.001 -> 0.01"):
        run(_compose(changed), tmp_path)
    assert not (tmp_path / RESULTS_FILE).exists()
    assert (tmp_path / CHECKPOINT_FILE).exists()


def test_resume_true_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"resume=true but .* has no checkpoint.pt"):
        run(_compose([*QUICK, "strategy=naive", "resume=true"]), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_checkpoint_is_an_error(tmp_path):
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"cannot be read.*resume=false"):
        run(_compose([*QUICK, "strategy=naive"]), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]
