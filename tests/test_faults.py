"""Bad input and failures: each case checks the error text and that no partial file is left.

Config errors must fail before anything is written. A diverging run keeps the finished
experiences in ``results.json`` with ``"complete": false``; no temporary file remains.
The last part covers degenerate input to the numerical core (PCA and flatness).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import vsfcl.strategies
from vsfcl.checkpoint import CHECKPOINT_FILE, CheckpointError
from vsfcl.flatness import find_flatness
from vsfcl.pca import trajectory_pca
from vsfcl.plugin import ProbeDivergenceError
from vsfcl.regularizer import SubspacePenalty, stiffness_from_variance
from vsfcl.train import RESULTS_FILE, USER_ERRORS, config_dir, run
from vsfcl.validation import ConfigError, DivergenceError

QUICK = [
    "benchmark.train_samples=200",
    "benchmark.test_samples=50",
    "train_epochs=1",
    "batch_size=32",
    "progress_bar=false",
]
FLATNESS = [
    "strategy=flatness",
    "strategy.n_snapshots=4",
    "strategy.n_directions=2",
    "strategy.window_fraction=1.0",
    "strategy.profile_samples=32",
]


def _compose(overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=[*QUICK, *overrides])


def _temporary_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.rglob("*") if p.name.endswith((".tmp", ".part")))


def _assert_nothing_written(run_dir: Path) -> None:
    if not run_dir.exists():
        return
    names = sorted(p.name for p in run_dir.iterdir())
    assert RESULTS_FILE not in names
    assert CHECKPOINT_FILE not in names
    assert "csv_logs" not in names
    assert "tb_logs" not in names
    assert _temporary_files(run_dir) == []


# ---------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------

BAD_CONFIGS = [
    (
        ["benchmark.name=cifar10"],
        r"benchmark.name='cifar10' is unknown; choose one of split_mnist, permuted_mnist",
    ),
    (["strategy.name=bogus"], r"strategy.name='bogus' is unknown; choose one of naive, joint"),
    (
        ["strategy=ewc", "strategy.ewc_lambda=-1"],
        r"strategy.ewc_lambda=-1 is out of range; it must be >= 0",
    ),
    (
        ["strategy=ewc", "strategy.ewc_lambda=big"],
        r"strategy.ewc_lambda='big' is invalid; it must be a finite number",
    ),
    (
        [*FLATNESS, "strategy.strength=-0.5"],
        r"strategy.strength=-0.5 is out of range; it must be >= 0",
    ),
    (
        [*FLATNESS, "strategy.n_directions=4"],
        r"n_directions=4 is out of range: K must be between 1 and n_snapshots - 1 = 3",
    ),
    (
        [*FLATNESS, "strategy.n_directions=many"],
        r"strategy.n_directions='many' is invalid; it must be an integer",
    ),
    (
        [*FLATNESS, "strategy.window_fraction=1.5"],
        r"window_fraction=1.5 is out of range; it must be in \(0, 1\]",
    ),
    (
        [*FLATNESS, "strategy.profile_rtol=0"],
        r"strategy.profile_rtol=0 is out of range; it must be > 0",
    ),
    (
        ["benchmark.n_experiences=3"],
        r"benchmark.n_experiences=3 does not divide the 10 MNIST classes",
    ),
    (
        ["benchmark=permuted_mnist", "benchmark.n_experiences=0"],
        r"benchmark.n_experiences=0 is invalid; it must be an integer >= 1",
    ),
    (
        ["benchmark.scenario=online"],
        r"benchmark.scenario='online' is invalid; use one of task, domain, class",
    ),
    (
        ["benchmark.valid_fraction=1.0"],
        r"benchmark.valid_fraction=1.0 is out of range; it must be in \[0, 1\)",
    ),
    (
        ["benchmark.train_samples=0"],
        r"benchmark.train_samples=0 is invalid; it must be an integer >= 1",
    ),
    (
        ["model.hidden_sizes=[400,0]"],
        r"model.hidden_sizes=\[400, 0\] is invalid; it must be a list of integers >= 1",
    ),
    (
        ["model.activation=sigmoid"],
        r"model.activation='sigmoid' is invalid; use one of relu, tanh, gelu",
    ),
    (["optimizer.lr=-0.1"], r"optimizer.lr=-0.1 is invalid; it must be a finite number > 0"),
    (["optimizer.lr=fast"], r"optimizer.lr='fast' is invalid"),
    (
        ["optimizer=sgd", "optimizer.momentum=1.0"],
        r"optimizer.momentum=1.0 is out of range; it must be in \[0, 1\)",
    ),
    (["train_epochs=0"], r"train_epochs=0 is invalid; it must be an integer >= 1"),
    (["batch_size=2.5"], r"batch_size=2.5 is invalid; it must be an integer >= 1"),
    (["resume=maybe"], r"resume='maybe' is invalid; use auto"),
    (["device=tpu"], r"device='tpu' is invalid; use auto, cpu, cuda or cuda:N"),
    ([*FLATNESS, "strategy.remove_drift=maybe"], r"strategy.remove_drift='maybe' is invalid"),
    ([*FLATNESS, "strategy.update=bogus"], r"update='bogus' is invalid"),
    ([*FLATNESS, "strategy.trajectory=adam"], r"trajectory='adam' is invalid"),
    ([*FLATNESS, "strategy.probe_lr=abc"], r"strategy.probe_lr='abc' is invalid"),
    ([*FLATNESS, "strategy.max_directions=abc"], r"strategy.max_directions='abc' is invalid"),
    (
        [*FLATNESS, "strategy.remove_drift=true", "strategy.n_directions=3"],
        r"n_directions=3 is out of range with remove_drift",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "message"), BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS]
)
def test_bad_config_rejected_before_writing(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        run(_compose(overrides), run_dir)
    _assert_nothing_written(run_dir)


def test_cuda_without_gpu_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        ConfigError, match=r"device=cuda was requested but no CUDA GPU is available"
    ):
        run(_compose(["device=cuda"]), tmp_path)
    _assert_nothing_written(tmp_path)


def test_unwritable_output_directory_rejected(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(
        ConfigError, match=r"the output directory .*/file/run cannot be written .*hydra.run.dir"
    ):
        run(_compose([]), blocker / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_unwritable_data_root_rejected(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    # Rejected before any download is tried.
    with pytest.raises(ConfigError, match=r"data_root=.*MNIST is not in .*cannot be written"):
        run(_compose([f"data_root={blocker / 'data'}"]), tmp_path / "run")
    _assert_nothing_written(tmp_path / "run")


@pytest.mark.slow
def test_snapshot_window_too_short_rejected(mnist, tmp_path):
    # 180 training samples in batches of 32 give 6 iterations; a tenth of them is 1.
    overrides = [*FLATNESS, "strategy.trajectory=training", "strategy.window_fraction=0.1"]
    with pytest.raises(
        ConfigError, match=r"snapshot window is 1 iteration\(s\) long .*PCA needs at least 2"
    ):
        run(_compose(overrides), tmp_path)
    _assert_nothing_written(tmp_path)


def _run_cli(overrides: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    """Run ``python -m vsfcl.train`` with the overrides into ``run_dir``, one thread."""
    command = [sys.executable, "-m", "vsfcl.train", *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
def test_cli_prints_config_error_and_exits_1(tmp_path):
    completed = _run_cli([*QUICK, "strategy=ewc", "strategy.ewc_lambda=-1"], tmp_path)
    assert completed.returncode == 1
    assert (
        "error: strategy=ewc: strategy.ewc_lambda=-1 is out of range; it must be >= 0"
        in completed.stderr
    )
    assert "Traceback" not in completed.stderr
    _assert_nothing_written(tmp_path)


# ---------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------


def _read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / RESULTS_FILE).read_text())


@pytest.mark.slow
def test_huge_learning_rate_stops_in_first_experience(mnist, tmp_path):
    overrides = ["strategy=naive", "optimizer=sgd", "optimizer.lr=1e6"]
    expected = r"training diverged in experience 0, epoch 0, iteration \d+ .*: the data loss is nan; lower the learning rate optimizer.lr=1e\+06"
    with pytest.raises(DivergenceError, match=expected):
        run(_compose(overrides), tmp_path)
    results = _read_results(tmp_path)
    assert results["complete"] is False
    assert results["accuracy_matrix"] == []
    assert results["acc"] is None
    assert results["error"].startswith("DivergenceError: training diverged in experience 0")
    assert not (tmp_path / CHECKPOINT_FILE).exists()
    assert _temporary_files(tmp_path) == []


@pytest.mark.slow
def test_huge_strength_keeps_finished_experience(mnist, tmp_path):
    overrides = [*FLATNESS, "optimizer=sgd", "strategy.strength=1e30"]
    with pytest.raises(DivergenceError, match=r"experience 1, .*strategy.strength=1e\+30"):
        run(_compose(overrides), tmp_path)
    results = _read_results(tmp_path)
    assert results["complete"] is False
    assert len(results["accuracy_matrix"]) == 1
    assert len(results["train_seconds"]) == 1
    assert [c["experience"] for c in results["flatness"]] == [0]
    assert "strategy.strength=1e+30" in results["error"]
    # The checkpoint of experience 0 stays, so nothing finished is lost.
    assert (tmp_path / CHECKPOINT_FILE).is_file()
    assert _temporary_files(tmp_path) == []


class _NaNAfter(torch.nn.CrossEntropyLoss):
    """Cross-entropy that returns NaN at one training call (calls with gradients enabled)."""

    calls = 0
    nan_at = 0

    def forward(self, output, target):
        loss = super().forward(output, target)
        if not torch.is_grad_enabled():
            return loss
        type(self).calls += 1
        return loss * math.nan if type(self).calls == type(self).nan_at else loss


@pytest.mark.slow
def test_nan_loss_names_experience_and_iteration(mnist, tmp_path, monkeypatch):
    # 180 training samples in batches of 32: 6 iterations per experience, so the
    # ninth training call is iteration 2 of experience 1.
    monkeypatch.setattr(_NaNAfter, "calls", 0)
    monkeypatch.setattr(_NaNAfter, "nan_at", 9)
    monkeypatch.setattr(vsfcl.strategies.nn, "CrossEntropyLoss", _NaNAfter)
    with pytest.raises(
        DivergenceError,
        match=r"experience 1, epoch 0, iteration 2 of the experience .*the data loss is nan",
    ):
        run(_compose(["strategy=naive"]), tmp_path)
    results = _read_results(tmp_path)
    assert len(results["accuracy_matrix"]) == 1
    assert "iteration 2" in results["error"]
    assert _temporary_files(tmp_path) == []


@pytest.mark.slow
def test_infinite_penalty_blames_strength(mnist, tmp_path, monkeypatch):
    def infinite_penalty(self, displacement):
        return displacement.sum() * 0.0 + math.inf

    monkeypatch.setattr(SubspacePenalty, "value", infinite_penalty)
    expected = r"experience 1, epoch 0, iteration 0 .*penalty inf\); the penalty overflowed, so lower the penalty strength strategy.strength=1"
    with pytest.raises(DivergenceError, match=expected):
        run(_compose(FLATNESS), tmp_path)
    assert _read_results(tmp_path)["complete"] is False
    assert _temporary_files(tmp_path) == []


@pytest.mark.slow
def test_cli_prints_divergence_and_exits_1(tmp_path):
    completed = _run_cli([*QUICK, "strategy=naive", "optimizer=sgd", "optimizer.lr=1e6"], tmp_path)
    assert completed.returncode == 1
    assert "error: training diverged in experience 0" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert _read_results(tmp_path)["complete"] is False


@pytest.mark.slow
def test_cli_prints_probe_divergence_on_own_line(tmp_path):
    completed = _run_cli(
        [
            *QUICK,
            *FLATNESS,
            "strategy.trajectory=sgd_probe",
            "strategy.probe_lr=1e6",
            "progress_bar=true",
        ],
        tmp_path,
    )
    assert completed.returncode == 1
    # The progress bar is closed first, so the message starts a line.
    error_lines = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, completed.stderr
    assert "lower strategy.probe_lr" in error_lines[0]
    assert "Traceback" not in completed.stderr


# ---------------------------------------------------------------------------
# Checkpoint and results files
# ---------------------------------------------------------------------------


class _Payload:
    """An object whose unpickling would create a file, to show that loading runs no code."""

    marker = ""

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_checkpoint_with_code_is_rejected_unrun(tmp_path):
    marker = tmp_path / "code_ran"
    payload = _Payload()
    payload.marker = str(marker)
    torch.save({"format_version": 1, "config": {}, "payload": payload}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(
        CheckpointError, match=r"contains objects other than tensors and plain values"
    ):
        run(_compose(["strategy=naive"]), tmp_path)
    assert not marker.exists()
    assert not (tmp_path / RESULTS_FILE).exists()


def test_checkpoint_of_other_format_is_rejected(tmp_path):
    torch.save({"format_version": 99}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(
        CheckpointError, match=r"has format version 99, but this vsfcl reads version 1"
    ):
        run(_compose(["strategy=naive"]), tmp_path)
    assert not (tmp_path / RESULTS_FILE).exists()


def test_unreadable_results_file_is_an_error(tmp_path):
    (tmp_path / RESULTS_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"results.json cannot be read .*resume=false"):
        run(_compose(["strategy=naive"]), tmp_path)
    assert (tmp_path / RESULTS_FILE).read_text() == "{not json"


# ---------------------------------------------------------------------------
# Degenerate input to PCA and flatness
# ---------------------------------------------------------------------------


def test_pca_rejects_more_directions_than_snapshots():
    with pytest.raises(
        ValueError,
        match=r"n_components=5 is out of range: it must be between 1 and min\(n_snapshots, n_params\) = 3",
    ):
        trajectory_pca(torch.randn(3, 10), n_components=5)


@pytest.mark.parametrize(
    ("shape", "method"), [((5, 10), "exact"), ((12, 3), "exact"), ((30, 40), "lowrank")]
)
def test_pca_of_identical_snapshots_is_zero(shape, method, caplog):
    snapshots = torch.full(shape, 0.7, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="vsfcl.pca"):
        pca = trajectory_pca(snapshots, n_components=2, method=method)
    assert "snapshots are identical" in caplog.text
    assert pca.total_variance == 0.0
    assert torch.equal(pca.variances, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(pca.directions, torch.zeros(2, shape[1], dtype=torch.float64))
    assert not bool(torch.isnan(pca.projections).any())
    with pytest.raises(ValueError, match="snapshots are identical"):
        stiffness_from_variance(pca.variances)


def test_pca_rejects_nan_snapshot():
    snapshots = torch.randn(6, 4)
    snapshots[2, 1] = math.nan
    with pytest.raises(ValueError, match=r"NaN or infinite weights \(first in snapshot 2 of 6\)"):
        trajectory_pca(snapshots)


@pytest.mark.parametrize("loss0", [0.0, -1.0, math.nan, math.inf])
def test_flatness_rejects_nonpositive_loss0(loss0):
    with pytest.raises(ValueError, match=r"L_0 must be positive and finite"):
        find_flatness(lambda i, o: torch.zeros_like(o), 1, loss0, initial_step=1.0, max_offset=10.0)


def test_flatness_of_flat_direction_is_censored():
    curvature = torch.tensor([2.0, 0.0], dtype=torch.float64)

    def loss_along(index, offset):
        return 0.5 + 0.5 * curvature[index] * offset.double() ** 2

    result = find_flatness(loss_along, 2, 0.5, initial_step=0.5, max_offset=16.0, rtol=1e-6)
    assert result.censored.tolist() == [False, True]
    expected = 2 * math.sqrt(2 * (math.e - 1) * 0.5 / 2.0)
    assert float(result.flatness[0]) == pytest.approx(expected, rel=1e-5)
    assert math.isnan(float(result.flatness[1]))
    # Doubling from 0.5 to 16 takes 6 evaluations per side of the flat direction.
    assert result.n_evaluations < 200


def test_flatness_treats_nan_loss_as_above_level():
    result = find_flatness(
        lambda i, o: torch.full_like(o, math.nan), 1, 1.0, initial_step=1.0, max_offset=10.0
    )
    assert not bool(result.censored[0])
    assert math.isfinite(float(result.flatness[0]))


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("max_offset", math.inf, r"max_offset=inf is invalid"),
        ("rtol", 0.0, r"rtol=0.0 is invalid"),
        ("level_factor", 1.0, r"level_factor=1.0 is invalid"),
        ("initial_step", math.nan, r"initial_step must be finite and positive"),
    ],
)
def test_flatness_rejects_bad_search_settings(keyword, value, message):
    settings = {"initial_step": 1.0, "max_offset": 10.0, keyword: value}
    with pytest.raises(ValueError, match=message):
        find_flatness(lambda i, o: o.double() ** 2 + 1.0, 1, 1.0, **settings)


def test_unmatched_parameter_pattern_fails_before_training(mnist, tmp_path):
    from hydra import compose, initialize_config_dir

    from vsfcl.train import config_dir, run
    from vsfcl.validation import ConfigError

    overrides = [
        "strategy=flatness",
        "strategy.parameters=[nomatch.*]",
        "benchmark.train_samples=1000",
        "batch_size=32",
        "benchmark.test_samples=20",
        "train_epochs=1",
        "progress_bar=false",
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with pytest.raises(ConfigError, match="pattern 'nomatch.\\*' matches no parameter"):
        run(cfg, tmp_path)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_short_experience_is_fine_with_the_sgd_probe(mnist, tmp_path):
    # The probe takes its own steps, so a window of one iteration does not matter.
    overrides = [*FLATNESS, "strategy.trajectory=sgd_probe", "strategy.window_fraction=0.1"]
    result = run(_compose(overrides), tmp_path)
    assert result["complete"] is True
    assert len(result["flatness"]) >= 1


@pytest.mark.slow
def test_diverging_probe_names_probe_lr(mnist, tmp_path):
    overrides = [*FLATNESS, "strategy.trajectory=sgd_probe", "strategy.probe_lr=1e6"]
    with pytest.raises(ProbeDivergenceError, match="lower strategy.probe_lr=1e"):
        run(_compose(overrides), tmp_path)
    assert _read_results(tmp_path)["complete"] is False
    # The command line prints it as an error line, without a traceback.
    assert ProbeDivergenceError in USER_ERRORS
