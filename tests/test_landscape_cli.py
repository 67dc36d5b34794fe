"""The vsfcl-landscape command: config composition and an end-to-end run on real MNIST."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from vsfcl.data.mnist import (
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    default_data_root,
    mnist_raw_dir,
)
from vsfcl.landscape.cli import config_dir, settings_from_config
from vsfcl.landscape.pipeline import TrainingSettings, load_classification_data

OPTIMIZERS = ["adam", "momentum", "sgd"]
SETTINGS = [
    "adam",
    "momentum",
    "sgd_b100",
    "sgd_b200",
    "sgd_b25",
    "sgd_b50",
    "sgd_lr005",
    "sgd_lr020",
]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("landscape", overrides=overrides)


def _mnist_files_present() -> bool:
    raw = mnist_raw_dir(default_data_root())
    return all(
        (raw / name).is_file() for name in (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
    )


def test_landscape_groups_match_files() -> None:
    root = Path(config_dir()) / "landscape"
    assert sorted(p.stem for p in (root / "optimizer").glob("*.yaml")) == OPTIMIZERS
    assert sorted(p.stem for p in (root / "setting").glob("*.yaml")) == sorted(SETTINGS)


@pytest.mark.parametrize("setting", SETTINGS)
def test_every_setting_composes(setting: str) -> None:
    cfg = _compose([f"landscape/setting={setting}"])
    settings = settings_from_config(cfg)
    optimizer = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
    expected_batch = {"sgd_b25": 25, "sgd_b100": 100, "sgd_b200": 200}.get(setting, 50)
    expected_lr = {"sgd_lr005": 0.05, "sgd_lr020": 0.2, "adam": 0.001}.get(setting, 0.1)
    assert settings.training.batch_size == expected_batch
    assert optimizer.defaults["lr"] == pytest.approx(expected_lr, rel=1e-12)
    expected_type = torch.optim.Adam if setting == "adam" else torch.optim.SGD
    assert isinstance(optimizer, expected_type)
    if setting == "momentum":
        assert optimizer.defaults["momentum"] == pytest.approx(0.9, rel=1e-12)


def test_default_settings_are_typed() -> None:
    settings = settings_from_config(_compose([]))
    assert settings.window.parameters == ("features.fc2.weight",)
    assert settings.training.hidden_sizes == (50, 50)
    assert settings.analysis.trajectory_planes == ((1, 2), (49, 50))
    assert settings.exploration.max_train_error == pytest.approx(0.001, rel=1e-12)


def test_bad_values_raise_with_the_value() -> None:
    with pytest.raises(ValueError, match="max_train_error=2.0 must be a fraction"):
        settings_from_config(_compose(["exploration.max_train_error=2.0"]))
    if not _mnist_files_present():
        pytest.skip(f"real MNIST is not in {default_data_root()}; run vsfcl-data to provision it")
    with pytest.raises(ValueError, match="train_subset=0 must be between 1 and 60000"):
        load_classification_data(TrainingSettings(train_subset=0), torch.device("cpu"))


@pytest.mark.slow
def test_command_runs_end_to_end(tmp_path: Path) -> None:
    if not _mnist_files_present():
        pytest.skip(f"real MNIST is not in {default_data_root()}; run vsfcl-data to provision it")
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "vsfcl.landscape.cli",
        "train_subset=2000",
        "exploration.max_epochs=4",
        "window_epochs=2",
        "snapshot_interval=1",
        "analysis.n_directions=8",
        "analysis.bootstrap_samples=100",
        "analysis.spectrum_min_index=5",
        "analysis.spectrum_max_index=40",
        "theory.minibatch.n_minibatches=10",
        "theory.minibatch.bootstrap_samples=100",
        "theory.langevin.n_samples=1000",
        "theory.langevin.n_steps=200",
        "theory.langevin.burn_in=50",
        "theory.langevin.n_directions=8",
        "theory.langevin.bootstrap_samples=100",
        f"hydra.run.dir={run_dir}",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]

    def reject_constant(name: str) -> None:
        raise AssertionError(f"summary.json contains {name}")

    summary = json.loads((run_dir / "summary.json").read_text(), parse_constant=reject_constant)
    for key in (
        "gamma",
        "n90",
        "psi",
        "psi_ci",
        "n_directions",
        "n_censored",
        "variance",
        "flatness",
        "curvature",
        "loss0",
        "exploration",
        "spectrum_fit",
        "timing",
        "null_reasons",
    ):
        assert key in summary, key
    assert summary["n_directions"] == 8
    assert len(summary["variance"]) == 8
    assert len(summary["flatness"]) == 8
    assert len(summary["curvature"]) == 8
    assert summary["loss0"] > 0
    assert summary["exploration"]["reached"] in (True, False)
    assert len(summary["exploration"]["history"]) == 6
    assert summary["spectrum_fit"]["min_index"] == 5
    # The random-landscape statistics and the Langevin contrast, one entry per direction.
    assert len(summary["random_landscape"]["temperature"]) == 8
    assert len(summary["random_landscape"]["correlation_time"]) == 8
    assert "psi" in summary["langevin"]
    # Every null entry has a stated reason.
    nulls = [key for key, value in summary.items() if value is None]
    assert set(nulls) <= set(summary["null_reasons"]), nulls

    for name in (
        "spectrum",
        "cumulative_variance",
        "trajectory_planes",
        "loss_profiles",
        "variance_flatness",
        "curvature_flatness",
    ):
        path = run_dir / f"{name}.png"
        assert path.stat().st_size > 5000, name
    with np.load(run_dir / "trajectory.npz") as arrays:
        assert arrays["snapshots"].shape == (80, 2500)
    with np.load(run_dir / "pca.npz") as arrays:
        assert arrays["directions"].shape == (8, 2500)
        assert arrays["flatness"].shape == (8,)


@pytest.mark.slow
def test_command_reports_invalid_setting(tmp_path: Path) -> None:
    if not _mnist_files_present():
        pytest.skip(f"real MNIST is not in {default_data_root()}; run vsfcl-data to provision it")
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "vsfcl.landscape.cli",
        "train_subset=0",
        f"hydra.run.dir={run_dir}",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1
    assert "error: train_subset=0 must be between 1 and 60000" in completed.stderr
    assert not (run_dir / "summary.json").exists()
