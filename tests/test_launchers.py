"""The sweep launcher configs: Slurm through Submitit, local processes through joblib.

The Slurm config is checked up to the batch script Submitit would submit; no cluster
is contacted. The local Submitit sweep runs two real, tiny training jobs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vsfcl.train import config_dir

submitit = pytest.importorskip(
    "submitit", reason="the cluster extra is not installed: pip install -e '.[cluster]'"
)
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
pytest.importorskip("hydra_plugins.hydra_joblib_launcher")

TINY = [
    "benchmark.train_samples=200",
    "benchmark.test_samples=50",
    "train_epochs=1",
    "batch_size=32",
    "progress_bar=false",
]
# Keys of Submitit's shared executor parameters; the others get the "slurm_" prefix,
# as hydra-submitit-launcher 1.2.0 does before calling update_parameters.
_SUBMITIT_BASE_KEYS = {
    "timeout_min",
    "cpus_per_task",
    "gpus_per_node",
    "tasks_per_node",
    "mem_gb",
    "nodes",
    "stderr_to_stdout",
}


def _hydra_config(*overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def _single_thread_env() -> dict[str, str]:
    # Every job is its own process; one PyTorch thread each keeps two jobs on two cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def test_slurm_config_composes():
    launcher = _hydra_config("hydra/launcher=slurm").hydra.launcher

    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition is None
    assert launcher.timeout_min == 120
    assert launcher.gpus_per_node == 1
    assert launcher.cpus_per_task == 4
    assert launcher.array_parallelism == 32
    assert OmegaConf.to_container(launcher.setup, resolve=True) == [
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}"
    ]


def test_slurm_batch_script(tmp_path, monkeypatch):
    # Submitit's Slurm executor refuses to start without srun on PATH; this stand-in is
    # never called, because only the batch script's text is built.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\necho 'fake srun' >&2\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")

    launcher = _hydra_config(
        "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30"
    ).hydra.launcher
    skipped = {"_target_", "submitit_folder", "max_num_timeout", "name"}
    parameters = {}
    for key in launcher:
        if key in skipped:
            continue
        value = (
            OmegaConf.to_container(launcher[key], resolve=True) if key == "setup" else launcher[key]
        )
        parameters[key if key in _SUBMITIT_BASE_KEYS else f"slurm_{key}"] = value
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(**parameters)
    script = executor._executor._make_submission_file_text("python -c pass", "uid")

    assert "#SBATCH --partition=gpu" in script
    assert "#SBATCH --time=30" in script
    assert "#SBATCH --gpus-per-node=1" in script
    assert "#SBATCH --cpus-per-task=4" in script
    assert "#SBATCH --mem=16GB" in script
    assert "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}" in script


def test_local_parallel_config_composes():
    launcher = _hydra_config(
        "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2"
    ).hydra.launcher

    assert launcher._target_.endswith("JoblibLauncher")
    assert launcher.n_jobs == 2
    assert launcher.backend == "loky"


def _sweep(tmp_path: Path, launcher: str, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    command = [
        sys.executable,
        "-m",
        "vsfcl.train",
        "-m",
        f"hydra/launcher={launcher}",
        *extra,
        "strategy=naive",
        "seed=0,1",
        *TINY,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    start = time.perf_counter()
    completed = subprocess.run(
        command, env=_single_thread_env(), capture_output=True, text=True, timeout=300
    )
    return completed, time.perf_counter() - start


def _check_two_jobs(sweep_dir: Path, completed: subprocess.CompletedProcess) -> None:
    assert completed.returncode == 0, completed.stderr[-3000:]
    for job, seed in ((0, 0), (1, 1)):
        results = json.loads((sweep_dir / str(job) / "results.json").read_text())
        assert results["complete"] is True
        assert results["seed"] == seed
        assert len(results["accuracy_matrix"]) == 5
    assert "sweep summary" in completed.stdout


@pytest.mark.slow
def test_submitit_local_two_job_sweep(mnist, tmp_path):
    completed, seconds = _sweep(tmp_path, "submitit_local", "hydra.launcher.timeout_min=5")

    _check_two_jobs(tmp_path / "sweep", completed)
    # Submitit keeps each job's pickled call and logs under the sweep folder.
    assert any((tmp_path / "sweep" / ".submitit").iterdir())
    print(f"submitit_local two-job sweep: {seconds:.1f} s")
